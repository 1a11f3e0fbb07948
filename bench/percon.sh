#!/usr/bin/env bash
# Per-connection cost of one server under a fixed number of short connections:
# syscalls by kind (perf syscall tracepoints, which barely perturb the server, unlike
# strace), context switches (voluntary / nonvoluntary, summed over the server's
# threads from /proc/PID/task/*/status), and server CPU time.
#
#   bench/percon.sh SERVER [CONNECTIONS] [MESSAGES_PER_CONNECTION] [extra server flags...]
#
# SERVER is sockpool, tokio or mio (SOCKPOOL=path picks another sockpool binary to serve). Runs `sockpool bench --churn --connections 8
# --churn-limit CONNECTIONS --warmup 0` (so the run ends by itself after exactly that
# many connections) with the server on CPU 0 and the bench on CPU 1, and prints one
# line per figure, divided by the connections opened. With CALLGRIND=1 the server runs
# under valgrind's callgrind and the line that counts is "user instructions/conn" (its
# user-space instructions over the window: repeatable on a busy machine, unlike time;
# the syscall and switch counts of such a run are not representative). Needs `perf` and the release
# binaries (cargo build --release --workspace --bins). Loopback only; the bench
# spreads its source addresses over 127.0.x.y, so TIME_WAIT stays bounded.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
KIND=${1:?usage: bench/percon.sh sockpool|tokio|mio [CONNECTIONS] [MESSAGES] [server flags...]}
CONNS=${2:-20000}
MSGS=${3:-1}
shift $(($# < 3 ? $# : 3))
BIN=${BIN:-$ROOT/target/release}
SYSCALLS=(accept4 epoll_wait epoll_ctl read recvfrom write sendto writev close shutdown
    futex setsockopt getsockopt ioctl fcntl sched_yield)

WORK=$(mktemp -d -t sockpool-percon.XXXXXX)
SERVER_PID=
cleanup() {
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

case "$KIND" in
    sockpool) cmd=("${SOCKPOOL:-$BIN/sockpool}" serve --listen 127.0.0.1:0 --no-metrics --workers 1
        --mode echo --max-connections 19000 "$@") ;;
    tokio) cmd=("$BIN/tokio-echo" --listen 127.0.0.1:0 --mode echo --threads 1) ;;
    mio) cmd=("$BIN/mio-echo" --listen 127.0.0.1:0) ;;
    *) echo "percon.sh: unknown server $KIND" >&2; exit 2 ;;
esac
if [ "${CALLGRIND:-}" = 1 ]; then
    cmd=(valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind.%p" "${cmd[@]}")
fi
taskset -c 0 "${cmd[@]}" > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
ADDR=
for _ in $(seq 300); do
    ADDR=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$WORK/server.log" | head -n1)
    [ -n "$ADDR" ] && break
    sleep 0.1
done
[ -n "$ADDR" ] || { cat "$WORK/server.log" >&2; exit 1; }
sleep 0.3 # let the server's threads settle
# TUNE: a shell snippet run once the server is up, with $SERVER_PID set; used to try a
# thread's placement or policy by hand, e.g.
#   TUNE='chrt -b -p 0 $(grep -l acceptor /proc/$SERVER_PID/task/*/comm | cut -d/ -f5)'
if [ -n "${TUNE:-}" ]; then eval "$TUNE"; fi

# threads PID: "name voluntary nonvoluntary" per thread.
threads() {
    for t in /proc/"$1"/task/*; do
        awk -v name="$(cat "$t/comm")" '/^voluntary_ctxt_switches/ {v = $2}
            /^nonvoluntary_ctxt_switches/ {n = $2} END {print name, v, n}' "$t/status"
    done 2>/dev/null | sort
}
# ctx PID: "voluntary nonvoluntary" summed over the process's threads.
ctx() {
    cat /proc/"$1"/task/*/status 2>/dev/null |
        awk '/^voluntary_ctxt_switches/ {v += $2} /^nonvoluntary_ctxt_switches/ {n += $2}
             END {print v + 0, n + 0}'
}
# ipis: "RES CAL" interrupts on CPU 0 (the server's), machine-wide: other load on
# CPU 0 adds to them, so read them as an upper bound.
ipis() { awk '$1 == "RES:" {r = $2} $1 == "CAL:" {c = $2} END {print r, c}' /proc/interrupts; }
# cpu PID: utime + stime in clock ticks.
cpu() { awk '{print $14 + $15}' /proc/"$1"/stat; }

events=task-clock,raw_syscalls:sys_enter
for s in "${SYSCALLS[@]}"; do
    if [ -e "/sys/kernel/tracing/events/syscalls/sys_enter_$s" ] ||
        [ -e "/sys/kernel/debug/tracing/events/syscalls/sys_enter_$s" ]; then
        events+=",syscalls:sys_enter_$s"
    fi
done
if [ "${CALLGRIND:-}" = 1 ]; then callgrind_control -z "$SERVER_PID" > /dev/null; fi
read -r v0 n0 < <(ctx "$SERVER_PID")
threads "$SERVER_PID" > "$WORK/threads0"
c0=$(cpu "$SERVER_PID")
read -r r0 f0 < <(ipis)
perf stat -x, -e "$events" -p "$SERVER_PID" -o "$WORK/perf.csv" &
PERF_PID=$!
sleep 0.2
taskset -c 1 "$BIN/sockpool" bench --addr "$ADDR" --json --threads 1 --connections 8 \
    --churn --messages-per-connection "$MSGS" --churn-limit "$CONNS" --warmup 0 \
    --duration 120s > "$WORK/bench.json"
sleep 0.2
kill -INT "$PERF_PID"
wait "$PERF_PID" || true
read -r v1 n1 < <(ctx "$SERVER_PID")
if [ "${CALLGRIND:-}" = 1 ]; then
    callgrind_control -d "$SERVER_PID" > /dev/null
    sleep 0.5
    # Each dump (one per thread is not asked for, so one per dump) has a totals line.
    ir=$(cat "$WORK"/callgrind.*.[0-9]* 2>/dev/null | awk '/^totals:/ {s += $2} END {print s + 0}')
    [ -n "${KEEP_CALLGRIND:-}" ] && cp "$WORK"/callgrind.*.[0-9]* "$KEEP_CALLGRIND" 2>/dev/null
fi
threads "$SERVER_PID" > "$WORK/threads1"
c1=$(cpu "$SERVER_PID")
read -r r1 f1 < <(ipis)
opened=$(sed -n 's/.*"connections_opened":\([0-9]*\).*/\1/p' "$WORK/bench.json")
errors=$(sed -n 's/.*"errors":\([0-9]*\).*/\1/p' "$WORK/bench.json")
tick=$(getconf CLK_TCK)
echo "server=$KIND connections=$opened messages/conn=$MSGS errors=$errors"
awk -v n="$opened" -v v="$((v1 - v0))" -v nv="$((n1 - n0))" -v c="$((c1 - c0))" -v t="$tick" 'BEGIN {
    printf "  %-24s %8.2f\n", "ctx voluntary/conn", v / n
    printf "  %-24s %8.2f\n", "ctx nonvoluntary/conn", nv / n
    printf "  %-24s %8.2f\n", "cpu us/conn", c * 1e6 / t / n
}'
awk -v n="$opened" -v r="$((r1 - r0))" -v f="$((f1 - f0))" 'BEGIN {
    printf "  %-24s %8.2f %8.2f\n", "CPU0 IPIs RES/CAL /conn", r / n, f / n
}'
if [ -n "${ir:-}" ]; then
    awk -v n="$opened" -v ir="$ir" 'BEGIN {printf "  %-24s %8.0f\n", "user instructions/conn", ir / n}'
fi
join "$WORK/threads0" "$WORK/threads1" | awk -v n="$opened" '{
    printf "  %-24s %8.2f %8.2f\n", "ctx vol/nonvol " $1, ($4 - $2) / n, ($5 - $3) / n
}'
awk -F, -v n="$opened" '$3 == "task-clock" {
    printf "  %-24s %8.2f\n", "task-clock us/conn", $1 * 1000 / n
}' "$WORK/perf.csv"
awk -F, -v n="$opened" '$3 ~ /sys_enter/ && $1 + 0 > 0 {
    name = $3; sub(/.*sys_enter_?/, "", name); if (name == "") name = "ALL";
    printf "  %-24s %8.2f\n", "syscalls " name "/conn", $1 / n
}' "$WORK/perf.csv"
