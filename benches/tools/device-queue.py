#!/usr/bin/env python3
"""Samples a block device's completed reads per second and its average queue depth (Little's law
from the weighted time-in-queue field of /sys/block/DEV/stat) every 250 ms, printing intervals
busier than 20k reads/s. Usage: device-queue.py DEV SECONDS (e.g. vda 90), started beside a
benchmark run."""
import sys
import time


def sample(dev):
    f = open(f"/sys/block/{dev}/stat").read().split()
    # Field 1: reads completed; field 11: weighted milliseconds spent with requests in flight.
    return int(f[0]), int(f[10]), time.monotonic()


def main():
    dev, secs = sys.argv[1], float(sys.argv[2])
    prev = sample(dev)
    end = time.monotonic() + secs
    while time.monotonic() < end:
        time.sleep(0.25)
        cur = sample(dev)
        dt = cur[2] - prev[2]
        iops = (cur[0] - prev[0]) / dt
        queue = (cur[1] - prev[1]) / 1000 / dt
        if iops > 20000:
            lat = queue / iops * 1e6
            print(f"{iops:8.0f} reads/s  queue {queue:5.1f}  {lat:4.0f} us/request", flush=True)
        prev = cur


main()
