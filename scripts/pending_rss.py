#!/usr/bin/env python3
"""Server memory under clients that never read (python3, standard library only).

Issue 8's traffic: CLIENTS connections with SO_RCVBUF=4096, each sending BYTES of
`\\n` (19 bytes of ack per byte in line framing) and never reading, against a
server with max_pending_write_bytes = 1024. Prints the server's RSS before and at
its peak, and the growth per connection. `--mode echo` runs the same traffic in
echo mode, for comparison.

    cargo build --release
    python3 scripts/pending_rss.py --bin target/release/sockpool
    python3 scripts/pending_rss.py --bin target/release/sockpool --mode echo

Every loop is bounded (BYTES per client, a write blocked for 1 s ends that
client, the settle wait is capped); traffic stays on 127.0.0.1. Exit status 0.
"""

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def start(binary, mode, workers):
    conf = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    conf.write(
        '[server]\nlisten = "127.0.0.1:0"\n'
        f"workers = {workers}\n"
        "[connection]\n"
        f'mode = "{mode}"\n'
        + ('framing = "line"\n' if mode == "ack" else "")
        + "max_pending_write_bytes = 1024\n"
        'idle_timeout = "0"\nwrite_timeout = "0"\n'
        "[metrics]\nenabled = false\n"
    )
    conf.close()
    proc = subprocess.Popen(
        [binary, "serve", "--config", conf.name],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        m = re.search(r"\] listening on (\S+)", line)
        if m:
            os.unlink(conf.name)
            host, port = m.group(1).rsplit(":", 1)
            # Keep draining the log so the server never blocks on it.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, (host, int(port))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    sys.exit(f"the server did not start: {proc.stderr.read()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default="target/release/sockpool")
    ap.add_argument("--mode", choices=["ack", "echo"], default="ack")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--bytes", type=int, default=512 * 1024)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    proc, addr = start(args.bin, args.mode, args.workers)
    try:
        # One exchange first, so that buffers touched by any traffic count in
        # the baseline.
        with socket.create_connection(addr, timeout=10) as c:
            c.sendall(b"warm\n")
            c.recv(64)
        time.sleep(0.3)
        before = rss(proc.pid)
        peak = [before]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss(proc.pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        clients = []
        for _ in range(args.clients):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(addr)
            clients.append(s)
        sent = [0] * len(clients)

        def writer(i, s):
            s.settimeout(1.0)
            chunk = b"\n" * 65536
            while sent[i] < args.bytes:
                try:
                    sent[i] += s.send(chunk[: args.bytes - sent[i]])
                except OSError:
                    break  # blocked for a second: the server stopped reading

        writers = [threading.Thread(target=writer, args=(i, s)) for i, s in enumerate(clients)]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        # Let the server work through what it took in (RSS stops moving).
        last, still = -1, 0
        for _ in range(100):
            now = rss(proc.pid)
            still = still + 1 if now == last else 0
            if still >= 5:
                break
            last = now
            time.sleep(0.1)
        done.set()
        sampler.join()
        growth = peak[0] - before
        print(
            f"mode={args.mode} clients={args.clients} sent={sum(sent)} bytes "
            f"(of {args.clients * args.bytes}); RSS before {before / 1024:.0f} KiB, "
            f"peak {peak[0] / 1024:.0f} KiB, growth {growth / 1024:.0f} KiB, "
            f"{growth / args.clients / 1024:.1f} KiB per connection"
        )
        for s in clients:
            s.close()
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()
