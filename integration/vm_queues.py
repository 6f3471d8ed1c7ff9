#!/usr/bin/env python3
"""Prints what QEMU knows of its virtio devices' queues, for a hang report: run-tests.sh calls
it when a guest's I/O stops (`vm_queues.py QMP_SOCKET`). For each virtio device and queue: QEMU's
ring addresses (x-query-virtio-vhost-queue-status, which sends the backend nothing) and the
split ring's indices as they are in guest memory, read with HMP `xp`: avail.idx is what the guest
published, used.idx what the backend answered, and the EVENT_IDX fields used_event (the guest
wants an interrupt once used.idx passes it) and avail_event (the backend wants a kick once
avail.idx passes it). Standard library only: it must run where the harness runs."""

import json
import socket
import sys


class Qmp:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buf = b""
        self.read()  # greeting
        self.execute("qmp_capabilities")

    def read(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, cmd, **args):
        self.sock.sendall(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n")
        while True:
            msg = self.read()
            if "event" in msg:
                continue
            if "error" in msg:
                return {"error": msg["error"].get("desc", msg["error"])}
            return msg.get("return")


def xp16(q, addr):
    """A 16-bit value of guest memory at guest-physical `addr` (HMP `xp`), or what went wrong."""
    out = q.execute("human-monitor-command", **{"command-line": f"xp /1hx {addr:#x}"})
    try:
        return int(str(out).split(":")[1].split()[0], 16)
    except (IndexError, ValueError):
        return f"? ({out!r})"


def main(path):
    q = Qmp(path)
    for dev in q.execute("x-query-virtio") or []:
        p = dev["path"]
        status = q.execute("x-query-virtio-status", path=p)
        print(f"device {p} ({dev.get('name')}): status {json.dumps(status.get('status'))}, "
              f"queues {status.get('num-vqs')}, broken {status.get('broken')}")
        for i in range(status.get("num-vqs") or 0):
            # Only queries that leave the device alone: x-query-virtio-queue-status asks a vhost
            # backend for its ring base (GET_VRING_BASE), which stops the ring.
            vq = q.execute("x-query-virtio-vhost-queue-status", path=p, queue=i)
            if not (isinstance(vq, dict) and "avail-phys" in vq):
                print(f"  queue {i}: {json.dumps(vq)}")
                continue
            num, avail, used = vq["num"], vq["avail-phys"], vq["used-phys"]
            # The split ring in guest memory (virtio 1.x, 2.7): avail {flags, idx, ring[num],
            # used_event}, used {flags, idx, ring[num] of 8 bytes, avail_event}.
            print(f"  queue {i}: {num} entries; guest avail.idx {xp16(q, avail + 2)}, "
                  f"used.idx {xp16(q, used + 2)}; used_event {xp16(q, avail + 4 + 2 * num)} "
                  f"(the guest wants an interrupt once used.idx passes it), avail_event "
                  f"{xp16(q, used + 4 + 8 * num)} (the backend wants a kick once avail.idx "
                  f"passes it); avail.flags {xp16(q, avail)}, used.flags {xp16(q, used)}")


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except Exception as e:  # a report tool: say what failed, never hide the rest of the report
        print(f"vm_queues: {type(e).__name__}: {e}")
        sys.exit(1)
