#!/usr/bin/env python3
"""Drives fvd's QMP control socket with the real qemu.qmp package (PyPI), as an operator's
script would. Run by tests/qmp.rs: `qmp_client.py CONTROL_SOCKET`. It prints `ready` once it
listens for events, waits for the test to connect and disconnect a vhost-user frontend
(X_FVD_FRONTEND_CONNECTED / _DISCONNECTED), then sends `quit` and expects SHUTDOWN and the end
of the connection. Exit status 0 when every check held."""

import asyncio
import sys

from qemu.qmp import ExecuteError, QMPClient, Runstate

TIMEOUT = 30


def check(cond, what):
    if not cond:
        raise AssertionError(what)


async def next_event(client, name):
    while True:
        ev = await asyncio.wait_for(client.events.get(), TIMEOUT)
        if ev["event"] == name:
            return ev


async def main(path):
    a = QMPClient("fvd-a")
    await a.connect(path)
    # Two clients at once.
    b = QMPClient("fvd-b")
    await b.connect(path)

    version = await a.execute("query-version")
    check(version["package"].startswith("fvd "), f"query-version: {version}")
    names = {c["name"] for c in await a.execute("query-commands")}
    for want in ["query-block", "query-blockstats", "query-block-jobs", "block-job-pause",
                 "block-job-resume", "block-job-set-speed", "block-job-cancel",
                 "block_resize", "block_set_io_throttle", "x-fvd-copy-on-read", "x-fvd-flush",
                 "quit"]:
        check(want in names, f"query-commands lacks {want}")

    blocks = await b.execute("query-block")
    check(len(blocks) == 1 and blocks[0]["device"] == "fvd0", f"query-block: {blocks}")
    ins = blocks[0]["inserted"]
    check(ins["drv"] == "fvd" and ins["image"]["virtual-size"] == 64 << 20, f"inserted: {ins}")
    stats = await b.execute("query-blockstats")
    check("wr_operations" in stats[0]["stats"], f"query-blockstats: {stats}")
    check(await a.execute("query-block-jobs") == [], "query-block-jobs is not empty")
    check(await a.execute("x-fvd-flush") == {}, "x-fvd-flush")

    throttle = {"device": "fvd0", "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 500,
                "iops_rd": 0, "iops_wr": 0, "iops_max": 1000, "iops_max_length": 2}
    check(await a.execute("block_set_io_throttle", throttle) == {}, "block_set_io_throttle")
    ins = (await b.execute("query-block"))[0]["inserted"]
    check(ins["iops"] == 500 and ins["iops_max"] == 1000 and ins["iops_max_length"] == 2,
          f"limits in query-block: {ins}")
    check(await a.execute("block_resize", {"node-name": "fvd0", "size": 96 << 20}) == {},
          "block_resize")
    ins = (await b.execute("query-block"))[0]["inserted"]
    check(ins["image"]["virtual-size"] == 96 << 20, f"size after block_resize: {ins}")
    for cmd, args, cls in [("block_resize", {"device": "fvd0", "size": 1}, "GenericError"),
                           ("block_resize", {"device": "fvd9", "size": 1 << 30}, "GenericError"),
                           ("block_set_io_throttle", {"device": "fvd0", "bps": 0}, "GenericError"),
                           ("nope", {}, "CommandNotFound"),
                           ("block-job-pause", {"device": "prefetch"}, "GenericError"),
                           ("query-block", {"bogus": 1}, "GenericError")]:
        try:
            await a.execute(cmd, args)
            raise AssertionError(f"{cmd} succeeded")
        except ExecuteError as e:
            check(e.error_class == cls, f"{cmd}: class {e.error_class}, want {cls}")
    await b.disconnect()

    print("ready", flush=True)
    await next_event(a, "X_FVD_FRONTEND_CONNECTED")
    print("connected", flush=True)
    await next_event(a, "X_FVD_FRONTEND_DISCONNECTED")
    print("disconnected", flush=True)

    check(await a.execute("quit") == {}, "quit")
    ev = await next_event(a, "SHUTDOWN")
    check(ev["data"]["reason"] == "host-qmp-quit", f"SHUTDOWN: {ev}")
    # The server closes the connection: the client sees the end of file by itself.
    while a.runstate == Runstate.RUNNING:
        await asyncio.wait_for(a.runstate_changed(), TIMEOUT)
    try:
        await a.disconnect()
    except EOFError:
        pass
    print("done", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
