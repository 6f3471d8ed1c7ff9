#!/usr/bin/env python3
"""How long the image's lock outlives a killed server: `lock-after-kill.py IMAGE PID` sends
PID (an `fvd serve` of IMAGE) SIGKILL, waits until the process has died (gone or a zombie),
then tries the same OFD write lock the server takes (F_OFD_SETLK) every millisecond and prints
how long after the death it was free. The kernel keeps the killed process's open file, and its
lock, until the io_uring requests it left in flight have completed (integration/README.md)."""

import fcntl
import os
import struct
import sys
import time


def main(path, pid):
    fd = os.open(path, os.O_RDWR)
    # struct flock: l_type, l_whence, l_start, l_len, l_pid (zero for OFD locks).
    fl = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0)
    os.kill(pid, 9)
    t0 = time.monotonic()
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.0005)
    t1 = time.monotonic()
    tries = 0
    while True:
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, fl)
            break
        except OSError:
            tries += 1
            time.sleep(0.001)
    t2 = time.monotonic()
    print(f"dead after {1000 * (t1 - t0):.1f} ms, lock free {1000 * (t2 - t1):.1f} ms "
          f"later ({tries} tries)")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
