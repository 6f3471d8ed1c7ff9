#!/usr/bin/env python3
"""Prints what QEMU knows of its virtio devices' queues, for a hang report: run-tests.sh calls
it when a guest's I/O stops (`vm_queues.py QMP_SOCKET`). For each virtio device and queue: QEMU's
own indices (x-query-virtio-queue-status: for a vhost-user device, last-avail-idx is what QEMU
last learnt from the backend) and the rings as they are in guest memory
(x-query-virtio-queue-element: avail.idx is what the guest published, used.idx what the backend
answered). Standard library only: it must run where the harness runs."""

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


def main(path):
    q = Qmp(path)
    for dev in q.execute("x-query-virtio") or []:
        p = dev["path"]
        status = q.execute("x-query-virtio-status", path=p)
        print(f"device {p} ({dev.get('name')}): status {json.dumps(status.get('status'))}, "
              f"queues {status.get('num-vqs')}, broken {status.get('broken')}")
        for i in range(status.get("num-vqs") or 0):
            qs = q.execute("x-query-virtio-queue-status", path=p, queue=i)
            el = q.execute("x-query-virtio-queue-element", path=p, queue=i)
            ring = {}
            if isinstance(el, dict) and "avail" in el:
                ring = {"guest avail.idx": el["avail"].get("idx"),
                        "guest used.idx": el["used"].get("idx"),
                        "avail.flags": el["avail"].get("flags"),
                        "used.flags": el["used"].get("flags")}
            print(f"  queue {i}: qemu {json.dumps(qs)}")
            print(f"  queue {i}: rings {json.dumps(ring or el)}")


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except Exception as e:  # a report tool: say what failed, never hide the rest of the report
        print(f"vm_queues: {type(e).__name__}: {e}")
        sys.exit(1)
