#!/usr/bin/env python3
"""Byte-for-byte stream forwarder between TCP and Unix sockets (a tiny socat stand-in).

The dev cluster (e2e/cluster/dev-cluster.sh) runs its API server inside a private network
namespace, where no TCP client of the host can reach it. A Unix socket in the state directory is
visible from both sides, so two forwarders make the API server reachable from the host:

    host:      bridge.py --listen tcp:127.0.0.1:16443 --connect unix:$STATE/apiserver.sock
    namespace: bridge.py --listen unix:$STATE/apiserver.sock --connect tcp:127.0.0.1:16443

TLS passes through untouched (the client talks TLS end to end with the API server). Half-closes are
forwarded, so long watches and streaming requests behave as on a direct connection.

Options:
    --listen ADDR       tcp:HOST:PORT or unix:PATH to accept connections on
    --connect ADDR      tcp:HOST:PORT or unix:PATH to dial for each accepted connection
    --ready-file PATH   written (empty) once the listener is bound, for the caller to wait on

SIGTERM/SIGINT close the listener, remove a Unix socket it created and exit 0.
"""

import argparse
import asyncio
import os
import signal
import sys

BUF = 256 * 1024


def parse_addr(text):
    kind, _, rest = text.partition(":")
    if kind == "unix" and rest:
        return ("unix", rest)
    if kind == "tcp":
        host, sep, port = rest.rpartition(":")
        if sep and host and port.isdigit():
            return ("tcp", (host.strip("[]"), int(port)))
    raise argparse.ArgumentTypeError(f"expected tcp:HOST:PORT or unix:PATH, got {text!r}")


def log(msg):
    print(f"bridge[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


async def dial(addr):
    kind, where = addr
    if kind == "unix":
        return await asyncio.open_unix_connection(where)
    return await asyncio.open_connection(where[0], where[1])


async def pump(reader, writer):
    """Copy reader -> writer until EOF; forward the EOF as a half-close. Raises on errors."""
    while True:
        data = await reader.read(BUF)
        if not data:
            break
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


def close(writer):
    try:
        writer.close()
    except Exception:  # noqa: BLE001 - best effort on an already broken transport
        pass


async def handle(target, c_reader, c_writer):
    try:
        u_reader, u_writer = await dial(target)
    except OSError as exc:
        log(f"connect {target}: {exc}")
        close(c_writer)
        return
    tasks = [
        asyncio.ensure_future(pump(c_reader, u_writer)),
        asyncio.ensure_future(pump(u_reader, c_writer)),
    ]
    try:
        # Wait for both directions; if one fails (reset, broken pipe), tear both down so the
        # other direction does not hang on a reader that will never see EOF.
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(t.exception() is not None for t in done if not t.cancelled()):
                for t in pending:
                    t.cancel()
                break
    finally:
        close(u_writer)
        close(c_writer)
        for t in tasks:
            if not t.done():
                t.cancel()


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", required=True, type=parse_addr)
    ap.add_argument("--connect", required=True, type=parse_addr)
    ap.add_argument("--ready-file")
    args = ap.parse_args()

    async def on_conn(r, w):
        await handle(args.connect, r, w)

    kind, where = args.listen
    if kind == "unix":
        try:
            os.unlink(where)
        except FileNotFoundError:
            pass
        old = os.umask(0o077)  # socket usable by its owner only (it gives admin access)
        try:
            server = await asyncio.start_unix_server(on_conn, path=where)
        finally:
            os.umask(old)
    else:
        server = await asyncio.start_server(on_conn, host=where[0], port=where[1], reuse_address=True)
    log(f"listening on {kind}:{where}, forwarding to {args.connect[0]}:{args.connect[1]}")

    if args.ready_file:
        with open(args.ready_file, "w"):
            pass

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # No wait_closed(): from Python 3.12 it waits for open connections (long watches).
    server.close()
    if kind == "unix":
        try:
            os.unlink(where)
        except FileNotFoundError:
            pass
    log("stopped")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except OSError as exc:
        log(f"error: {exc}")
        sys.exit(1)
