#!/usr/bin/env python3
"""Scrape latency of a ~100 KB /metrics (--workers 1024), and the process's
threads/fds at rest and under a slowloris on the metrics port, for one sockpool
binary. Loopback only (client sources spread over 127.2.0.0/16), bounded: about
a minute when scrapes do not stall.

    python3 scripts/sidecar_scrape.py target/release/sockpool [SEQUENTIAL [ROUNDS]]

SEQUENTIAL scrapes one after the other (default 100), then ROUNDS rounds of 20
concurrent scrapes (default 5); "incomplete" counts answers that were not a whole
200 with the last worker's series. Then 1000 slowloris connections, each sending
one more header byte every 0.5 s for 8 s, and one scrape meanwhile."""
import os, re, socket, subprocess, sys, time, threading, statistics

binary = sys.argv[1]
proc = subprocess.Popen([binary, "serve", "--listen", "127.0.0.1:0", "--metrics-listen",
                         "127.0.0.1:0", "--workers", "1024"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
addr = None
deadline = time.time() + 20
while time.time() < deadline and addr is None:
    line = proc.stderr.readline()
    m = re.search(r"metrics on http://([0-9.]+):(\d+)/metrics", line)
    if m:
        addr = (m.group(1), int(m.group(2)))
threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
pid = proc.pid

def counts():
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))

def sidecar_threads():
    n = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            if open(f"/proc/{pid}/task/{t}/comm").read().startswith("metrics-"):
                n += 1
        except OSError:
            pass
    return n

src = [0]
def conn():
    src[0] += 1
    s = socket.socket()
    s.bind((f"127.2.{(src[0] >> 8) & 255}.{src[0] & 255}", 0))
    s.settimeout(30)
    s.connect(addr)
    return s

def scrape():
    t0 = time.perf_counter()
    s = conn()
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
    data = b""
    try:
        while True:
            b = s.recv(65536)
            if not b:
                break
            data += b
    except socket.timeout:
        pass
    s.close()
    dt = time.perf_counter() - t0
    ok = data.startswith(b"HTTP/1.1 200") and b'worker="1023"' in data.split(b"sockpool_worker_busy")[-1]
    return dt, ok, len(data)

for _ in range(5):
    scrape()
rest = counts()
lat = []; bad = 0; size = 0
N = int(sys.argv[2]) if len(sys.argv) > 2 else 100
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 5
for _ in range(N):
    dt, ok, n = scrape()
    lat.append(dt); bad += (not ok); size = max(size, n)
lat.sort()
print(f"sequential: {N} scrapes of {size} bytes: p50 {lat[N//2-1]*1000:.1f} ms, p90 {lat[N*9//10-1]*1000:.1f} ms, "
      f"max {lat[-1]*1000:.1f} ms, incomplete {bad}")

# 20 concurrent, 5 rounds
cres = []
for r in range(ROUNDS):
    out = []
    ths = [threading.Thread(target=lambda: out.append(scrape())) for _ in range(20)]
    [t.start() for t in ths]; [t.join() for t in ths]
    cres += out
lat = sorted(d for d, _, _ in cres)
M = len(lat)
print(f"20 concurrent x{ROUNDS}: p50 {lat[M//2-1]*1000:.1f} ms, p90 {lat[M*9//10-1]*1000:.1f} ms, max {lat[-1]*1000:.1f} ms, "
      f"incomplete {sum(1 for _, ok, _ in cres if not ok)} of {len(cres)}")

print(f"at rest: threads {rest[0]} (sidecar: {sidecar_threads()}), fds {rest[1]}")
# slowloris: 1000 connections each dribbling a header byte every 0.5 s for 8 s
slow = []
for i in range(1000):
    try:
        s = conn(); s.sendall(b"GET /metrics HTTP/1.1\r\nX-"); slow.append(s)
    except OSError as e:
        print("slowloris connect failed:", e); break
peak = counts()
speak = sidecar_threads()
t_end = time.time() + 8
while time.time() < t_end:
    for s in slow:
        try: s.send(b"a")
        except OSError: pass
    peak = tuple(max(a, b) for a, b in zip(peak, counts()))
    speak = max(speak, sidecar_threads())
    time.sleep(0.5)
dt, ok, n = scrape()
print(f"slowloris 1000 conns: peak threads {peak[0]} (sidecar: {speak}), fds {peak[1]}; a scrape meanwhile: "
      f"{'200 whole' if ok else 'FAILED'} in {dt*1000:.1f} ms")
for s in slow: s.close()
time.sleep(1)
print(f"after: threads {counts()[0]} (sidecar: {sidecar_threads()}), fds {counts()[1]}")
proc.terminate(); proc.wait(timeout=20)
