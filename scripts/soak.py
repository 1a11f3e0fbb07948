#!/usr/bin/env python3
"""Soak test for sockpool (python3, standard library only).

64 connections in line framing for DURATION seconds: random message sizes,
pipelined batches, every reply verified byte for byte; clean closes, half-closes
with a partial final line, and resets (after reading every reply, or with replies
still in flight) mixed in. Every 10 s it samples the server's RSS, fds and
threads. At the end it compares the server's byte and message counters with what
the clients sent and received, checks accepted = sum(closed) + active, and
whether RSS was flat over the last 80 % of the run and fds/threads came back.

    cargo build --release
    nice -n 10 python3 scripts/soak.py --bin target/release/sockpool --duration 600

Or against a server that is already running in line framing (its RSS then comes
from /metrics, or from /proc with --pid):

    python3 scripts/soak.py --addr 127.0.0.1:20000 --metrics 127.0.0.1:20001

Exit status: 0 if every reply matched and every check passed, 1 otherwise.
Traffic goes to loopback addresses only; every loop is bounded by the duration.
"""

import argparse
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

PREFIX = b'Server received "'


def ack(line, newline=True):
    """The reply to one line (one trailing \\r is dropped before a \\n)."""
    if newline and line.endswith(b"\r"):
        line = line[:-1]
    return PREFIX + line + (b'"\n' if newline else b'"')


class Totals:
    """What the clients did, summed over all threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.c = dict(
            connections=0, closes=0, half_closes=0, clean_resets=0, dirty_resets=0,
            messages=0, sent=0, received=0, mismatches=0, errors=0,
            # Dirty resets: bytes sent whose replies were never read, so the
            # server may or may not have read them / written their replies.
            uncertain_sent=0, uncertain_reply=0, uncertain_messages=0,
        )
        self.first_error = None

    def add(self, **kw):
        with self.lock:
            for k, v in kw.items():
                self.c[k] += v

    def error(self, what):
        with self.lock:
            self.c["errors"] += 1
            if self.first_error is None:
                self.first_error = what


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def recv_to_eof(sock):
    buf = bytearray()
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return bytes(buf)
        buf += chunk


def random_line(rng, max_line):
    """A line without \\n: mostly short, sometimes near the limit."""
    r = rng.random()
    if r < 0.70:
        n = rng.randint(0, 64)
    elif r < 0.97:
        n = rng.randint(0, 4096)
    else:
        n = rng.randint(0, max_line)
    n = min(n, max_line)
    return rng.randbytes(n).replace(b"\n", b"|")


def client(idx, addr, deadline, max_line, totals, seed):
    rng = random.Random(seed * 1000 + idx)
    while time.monotonic() < deadline:
        try:
            one_connection(rng, addr, deadline, max_line, totals)
        except (OSError, ValueError) as e:
            totals.error(f"client {idx}: {e!r}")
            time.sleep(0.1)


def one_connection(rng, addr, deadline, max_line, totals):
    sock = socket.create_connection(addr, timeout=30)
    totals.add(connections=1)
    try:
        batches = rng.randint(1, 40)
        for _ in range(batches):
            if time.monotonic() >= deadline:
                break
            lines, size = [], 0
            for _ in range(rng.randint(1, 16)):
                line = random_line(rng, max_line)
                if size + len(line) > 256 * 1024:
                    break
                lines.append(line)
                size += len(line) + 1
            payload = b"".join(line + b"\n" for line in lines)
            want = b"".join(ack(line) for line in lines)
            sock.sendall(payload)
            got = recv_exact(sock, len(want))
            totals.add(sent=len(payload), received=len(got), messages=len(lines))
            if got != want:
                totals.add(mismatches=1)
                totals.error(f"mismatch: {len(got)} bytes, wanted {len(want)}")
                return
        end = rng.random()
        if end < 0.70:
            sock.close()
            totals.add(closes=1)
        elif end < 0.85:
            tail = random_line(rng, 200).rstrip(b"\r") or b"t"
            sock.sendall(tail)
            sock.shutdown(socket.SHUT_WR)
            got = recv_to_eof(sock)
            want = ack(tail, newline=False)
            totals.add(sent=len(tail), received=len(got), messages=1, half_closes=1)
            if got != want:
                totals.add(mismatches=1)
                totals.error(f"half-close: got {got[:60]!r}, wanted {want[:60]!r}")
        elif end < 0.93:
            reset(sock)
            totals.add(clean_resets=1)
        else:
            lines = [random_line(rng, 512) for _ in range(rng.randint(1, 8))]
            payload = b"".join(line + b"\n" for line in lines)
            sock.sendall(payload)
            reset(sock)
            totals.add(
                dirty_resets=1,
                uncertain_sent=len(payload),
                uncertain_reply=sum(len(ack(line)) for line in lines),
                uncertain_messages=len(lines),
            )
    finally:
        sock.close()


def reset(sock):
    """Close with RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def scrape(metrics):
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                values[name] = float(value)
            except ValueError:
                pass
    return values


def total(values, name):
    return sum(v for k, v in values.items() if k.startswith(name + "{"))


def proc_figures(pid):
    """(rss bytes, fds, threads) of a local process."""
    with open(f"/proc/{pid}/status") as f:
        status = f.read()
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss, fds, threads


def figures(pid, metrics):
    if pid:
        return proc_figures(pid)
    v = scrape(metrics)
    return (int(v["process_resident_memory_bytes"]), int(v["process_open_fds"]),
            int(v["process_threads"]))


def start_server(binary, max_line):
    log = tempfile.NamedTemporaryFile(prefix="sockpool-soak-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [binary, "serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
         "--framing", "line", "--max-line-bytes", str(max_line), "--idle-timeout", "60s"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with open(log.name) as f:
            text = f.read()
        main = re.search(r"listening on (\S+) ", text)
        metrics = re.search(r"metrics on http://(\S+)/metrics", text)
        if main and metrics:
            return proc, main.group(1), metrics.group(1), log.name
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    sys.exit(f"the server did not start; log in {log.name}")


def parse_addr(s):
    host, _, port = s.rpartition(":")
    return host.strip("[]"), int(port)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", help="start this sockpool binary (line framing)")
    ap.add_argument("--addr", help="a running server in line framing, HOST:PORT")
    ap.add_argument("--metrics", help="its metrics sidecar, HOST:PORT")
    ap.add_argument("--pid", type=int, help="its pid, for RSS/fds/threads from /proc")
    ap.add_argument("--duration", type=float, default=600, help="seconds (default 600)")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--max-line-bytes", type=int, default=65536,
                    help="the server's max_line_bytes; lines stay within it")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    proc = None
    if args.bin:
        proc, main_addr, metrics, log = start_server(args.bin, args.max_line_bytes)
        pid = proc.pid
        print(f"started {args.bin} pid {pid}: {main_addr}, metrics {metrics}, log {log}")
    elif args.addr and args.metrics:
        main_addr, metrics, pid = args.addr, args.metrics, args.pid
    else:
        ap.error("give --bin, or --addr and --metrics")
    host, _ = parse_addr(main_addr)
    if not host.startswith("127.") and host not in ("::1", "localhost"):
        sys.exit("refusing to soak a non-loopback address")

    failures = []
    base_values = scrape(metrics)
    baseline = figures(pid, metrics)
    print(f"baseline: rss {baseline[0] / 2**20:.1f} MiB, fds {baseline[1]}, "
          f"threads {baseline[2]}")

    totals = Totals()
    start = time.monotonic()
    deadline = start + args.duration
    threads = [
        threading.Thread(target=client, daemon=True,
                         args=(i, parse_addr(main_addr), deadline, args.max_line_bytes,
                               totals, args.seed))
        for i in range(args.connections)
    ]
    for t in threads:
        t.start()
    samples = []  # (seconds since start, rss, fds, threads)
    next_sample = start
    while time.monotonic() < deadline:
        now = time.monotonic()
        if now >= next_sample:
            rss, fds, nthreads = figures(pid, metrics)
            samples.append((now - start, rss, fds, nthreads))
            with totals.lock:
                c = dict(totals.c)
            print(f"[{now - start:6.0f}s] rss {rss / 2**20:6.1f} MiB  fds {fds:4d}  "
                  f"threads {nthreads:3d}  conns {c['connections']}  msgs {c['messages']}  "
                  f"errors {c['errors']}", flush=True)
            next_sample += 10
        time.sleep(min(1.0, max(0.0, min(next_sample, deadline) - time.monotonic())))
    for t in threads:
        t.join(timeout=60)
    if any(t.is_alive() for t in threads):
        failures.append("a client thread did not finish")

    # At rest: wait (bounded) for every connection to be closed on the server.
    rest_deadline = time.monotonic() + 30
    while True:
        v = scrape(metrics)
        if v["sockpool_connections_active"] == 0 or time.monotonic() > rest_deadline:
            break
        time.sleep(0.2)
    end = figures(pid, metrics)
    c = totals.c
    elapsed = time.monotonic() - start

    def delta(name):
        return v.get(name, 0) - base_values.get(name, 0)

    print(f"\n== {elapsed:.0f} s, {args.connections} client threads ==")
    print(f"connections {c['connections']}: closes {c['closes']}, half-closes "
          f"{c['half_closes']}, resets {c['clean_resets']} clean + {c['dirty_resets']} "
          f"in flight; messages {c['messages']} verified "
          f"({c['messages'] / elapsed:.0f}/s), {c['sent'] / 2**20:.1f} MiB sent, "
          f"{c['received'] / 2**20:.1f} MiB received")
    print(f"mismatches {c['mismatches']}, client errors {c['errors']}"
          + (f" (first: {totals.first_error})" if totals.first_error else ""))
    if c["mismatches"] or c["errors"]:
        failures.append("mismatches or client errors")

    checks = [
        ("received bytes", delta("sockpool_received_bytes_total"), c["sent"],
         c["sent"] + c["uncertain_sent"]),
        ("sent bytes", delta("sockpool_sent_bytes_total"), c["received"],
         c["received"] + c["uncertain_reply"]),
        ("messages", delta("sockpool_messages_total"), c["messages"],
         c["messages"] + c["uncertain_messages"]),
        ("accepted", delta("sockpool_connections_accepted_total"), c["connections"],
         c["connections"]),
    ]
    for name, server, low, high in checks:
        ok = low <= server <= high
        print(f"server {name}: {server:.0f}, clients say {low}..{high}: "
              f"{'ok' if ok else 'MISMATCH'}")
        if not ok:
            failures.append(f"server {name} {server:.0f} not in {low}..{high}")
    accepted = v["sockpool_connections_accepted_total"]
    closed = total(v, "sockpool_connections_closed_total")
    active = v["sockpool_connections_active"]
    reasons = {k.split('"')[1]: int(val - base_values.get(k, 0)) for k, val in v.items()
               if k.startswith("sockpool_connections_closed_total{")}
    print(f"closed by reason: {reasons}")
    want_reasons = {"client_closed": c["closes"] + c["half_closes"],
                    "reset": c["clean_resets"] + c["dirty_resets"]}
    for reason, n in want_reasons.items():
        if reasons.get(reason) != n:
            failures.append(f"closed {reason} {reasons.get(reason)} != {n} by the clients")
    others = sum(n for r, n in reasons.items() if r not in want_reasons)
    if others:
        failures.append(f"{others} connections closed for other reasons")
    print(f"accepted {accepted:.0f} = closed {closed:.0f} + active {active:.0f}: "
          f"{'ok' if accepted == closed + active else 'NO'}")
    if accepted != closed + active or active != 0:
        failures.append("counters do not add up at rest")

    # RSS over the last 80 % of the run.
    tail = [s for s in samples if s[0] >= 0.2 * args.duration] or samples
    rss = [s[1] for s in tail]
    spread = max(rss) - min(rss)
    growth = rss[-1] - rss[0]
    flat = spread < max(8 << 20, 0.10 * min(rss))
    print(f"RSS over the last 80 % ({len(tail)} samples): min {min(rss) / 2**20:.1f} MiB, "
          f"max {max(rss) / 2**20:.1f} MiB, first-to-last {growth / 2**20:+.1f} MiB: "
          f"{'flat' if flat else 'NOT FLAT'}")
    if not flat:
        failures.append("RSS not flat")
    print(f"fds {baseline[1]} -> {end[1]}, threads {baseline[2]} -> {end[2]} "
          f"(rss {baseline[0] / 2**20:.1f} -> {end[0] / 2**20:.1f} MiB)")
    if end[1] > baseline[1] or end[2] > baseline[2]:
        failures.append("fds or threads above baseline")

    if proc:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "timeout"
        print(f"server exit after SIGTERM: {code}")
        if code != 0:
            failures.append(f"server exit {code}")
    print("PASS" if not failures else "FAIL: " + "; ".join(failures))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
