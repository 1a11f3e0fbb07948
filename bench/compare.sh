#!/usr/bin/env bash
# Compares sockpool with the baselines (tokio-echo, mio-echo) scenario by scenario.
#
#   bench/compare.sh [--duration 5s] [--warmup 1s] [--rounds 3] [--hold 10000]
#                    [--servers sockpool,tokio,mio] [--only REGEX] [--quick]
#                    [--out BENCHMARKS.md]
#
# Builds everything in release mode, pins every server to CPU 0 and the load
# generator (`sockpool bench`) to CPU 1, and runs each scenario against each server,
# interleaved round by round (a fresh server process per run). Each bench run reads
# the server's CPU time from /proc/PID/stat over exactly its measured window. Writes
# BENCHMARKS.md (table of medians, chart, date, CPU, command) and, beside the chart,
# the raw results as JSON lines. All traffic is on 127.0.0.1; every run is bounded by
# its duration and the bench's reply timeout. With the defaults it takes about ten
# minutes (30 runs a round); `--quick` takes about one.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DURATION=5s
WARMUP=1s
ROUNDS=3
HOLD=10000
SERVERS=sockpool,tokio,mio
ONLY=.
OUT=$ROOT/BENCHMARKS.md
COMMAND="bench/compare.sh $*"

while [ $# -gt 0 ]; do
    case "$1" in
        --duration) DURATION=$2; shift 2 ;;
        --warmup) WARMUP=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --hold) HOLD=$2; shift 2 ;;
        --servers) SERVERS=$2; shift 2 ;;
        --only) ONLY=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --quick) DURATION=1s; WARMUP=300ms; ROUNDS=1; HOLD=2000; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "compare.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ "$(nproc)" -lt 2 ]; then
    echo "compare.sh: needs 2 CPUs (server on CPU 0, load on CPU 1), found $(nproc)" >&2
    exit 1
fi

echo "building (release)..." >&2
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" --workspace --bins
TARGET=$(cargo metadata --format-version 1 --no-deps --manifest-path "$ROOT/Cargo.toml" |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
BIN=$TARGET/release
CHART_DIR=$(dirname "$OUT")/bench
mkdir -p "$CHART_DIR"
RESULTS=$CHART_DIR/results.jsonl
: > "$RESULTS"

# 10,000 held connections plus the run's own: every process here may use the hard limit.
ulimit -n "$(ulimit -Hn)"

WORK=$(mktemp -d -t sockpool-compare.XXXXXX)
SERVER_PID=
cleanup() {
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# start_server KIND: starts one server on CPU 0 with port 0; sets SERVER_PID,
# SERVER_ADDR and METRICS_ADDR (empty without metrics).
start_server() {
    local kind=$1 log=$WORK/server.log
    local -a cmd
    case "$kind" in
        sockpool-echo) cmd=("$BIN/sockpool" serve --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0
            --workers 1 --mode echo --max-connections 19000) ;;
        sockpool-echo-nometrics) cmd=("$BIN/sockpool" serve --listen 127.0.0.1:0 --no-metrics
            --workers 1 --mode echo --max-connections 19000) ;;
        sockpool-ack) cmd=("$BIN/sockpool" serve --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0
            --workers 1 --mode ack --framing line --max-connections 19000) ;;
        tokio-echo) cmd=("$BIN/tokio-echo" --listen 127.0.0.1:0 --mode echo --threads 1) ;;
        tokio-ack) cmd=("$BIN/tokio-echo" --listen 127.0.0.1:0 --mode ack-line --threads 1) ;;
        mio-echo) cmd=("$BIN/mio-echo" --listen 127.0.0.1:0) ;;
        *) echo "compare.sh: unknown server $kind" >&2; exit 1 ;;
    esac
    # Emptied here, not only by the redirection below: that one runs in the
    # background child, possibly after the loop below has read the previous
    # server's "listening on" line (seen: a bench sent to the last run's port).
    : > "$log"
    taskset -c 0 "${cmd[@]}" > "$log" 2>&1 &
    SERVER_PID=$!
    SERVER_ADDR=
    METRICS_ADDR=
    for _ in $(seq 100); do
        SERVER_ADDR=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$log" | head -n1)
        [ -n "$SERVER_ADDR" ] && break
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then break; fi
        sleep 0.1
    done
    if [ -z "$SERVER_ADDR" ]; then
        echo "compare.sh: $kind did not start; its output:" >&2
        cat "$log" >&2
        exit 1
    fi
    METRICS_ADDR=$(sed -n 's|.*metrics on http://\([0-9.:]*\)/metrics.*|\1|p' "$log" | head -n1)
}

stop_server() {
    kill "$SERVER_PID" 2>/dev/null || true
    # Bounded wait: sockpool drains for its grace period at most.
    for _ in $(seq 150); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}

# run NAME KIND SCENARIO ROUND [bench flags...]: one fresh server, one bench run on CPU 1.
run() {
    local name=$1 kind=$2 scenario=$3 round=$4
    shift 4
    [[ $scenario =~ $ONLY ]] || return 0
    start_server "$kind"
    local -a extra=()
    if [ "${SCRAPE:-}" = 1 ] && [ -n "$METRICS_ADDR" ]; then extra=(--scrape "$METRICS_ADDR"); fi
    local json
    if json=$(taskset -c 1 "$BIN/sockpool" bench --addr "$SERVER_ADDR" --server-pid "$SERVER_PID" \
        --json --threads 1 --duration "$DURATION" --warmup "$WARMUP" "$@" "${extra[@]}" 2> "$WORK/bench.err"); then
        printf '{"server":"%s","scenario":"%s","round":%s,"result":%s}\n' \
            "$name" "$scenario" "$round" "$json" >> "$RESULTS"
        printf '  %-26s %-22s %10.0f msgs/s\n' "$scenario" "$name" \
            "$(sed -n 's/.*"msgs_per_s":\([0-9.e+]*\).*/\1/p' <<< "$json")" >&2
    else
        echo "  $scenario $name: bench failed: $(tr '\n' ' ' < "$WORK/bench.err")" >&2
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "  (the server had exited)" >&2; fi
        echo "  server log, last lines:" >&2
        tail -n 5 "$WORK/server.log" | sed 's/^/    /' >&2
    fi
    stop_server
}

has() { [[ ",$SERVERS," == *",$1,"* ]]; }

# echo_all SCENARIO [bench flags...]: the scenario against every echo server.
echo_all() {
    local scenario=$1 round=$2
    shift 2
    if has sockpool; then run sockpool sockpool-echo "$scenario" "$round" "$@"; fi
    if has tokio; then run tokio tokio-echo "$scenario" "$round" "$@"; fi
    if has mio; then run mio mio-echo "$scenario" "$round" "$@"; fi
}

ack_all() {
    local scenario=$1 round=$2
    shift 2
    if has sockpool; then run sockpool sockpool-ack "$scenario" "$round" --mode ack-line "$@"; fi
    if has tokio; then run tokio tokio-ack "$scenario" "$round" --mode ack-line "$@"; fi
}

for round in $(seq "$ROUNDS"); do
    echo "round $round of $ROUNDS" >&2
    for c in 16 64 512; do echo_all "echo-pp-$c" "$round" --connections "$c"; done
    ack_all ack-pp-16 "$round" --connections 16
    ack_all ack-pipe16-16 "$round" --connections 16 --pipeline 16
    echo_all "echo-pp-64-hold$HOLD" "$round" --connections 64 --hold "$HOLD"
    echo_all mem-base "$round" --connections 1
    echo_all mem-hold "$round" --connections 1 --hold "$HOLD"
    echo_all churn-8 "$round" --connections 8 --churn
    echo_all session-8 "$round" --connections 8 --churn --messages-per-connection 5
    if has sockpool; then
        SCRAPE=1 run sockpool sockpool-echo metrics-scraped-pp-64 "$round" --connections 64
        run "sockpool --no-metrics" sockpool-echo-nometrics metrics-scraped-pp-64 "$round" --connections 64
    fi
    echo_all bulk-64k-4 "$round" --connections 4 --size 65536
done

TABLE=$("$BIN/report" "$RESULTS")
CPU=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)
CHART_REL=$(realpath --relative-to="$(dirname "$OUT")" "$CHART_DIR/throughput.svg")
RESULTS_REL=$(realpath --relative-to="$(dirname "$OUT")" "$RESULTS")
CHART_MD="![Throughput against connection count]($CHART_REL)"
if ! "$BIN/chart" "$RESULTS" "$CHART_DIR/throughput.svg"; then
    CHART_MD="(No chart: no echo-pp-N scenario completed.)"
fi
{
    cat <<EOF_MD
# Benchmarks

Measured $(date -u '+%Y-%m-%d %H:%M UTC') on ${CPU:-an unknown CPU} ($(nproc) CPUs) with
\`$COMMAND\`.

Every server runs alone on CPU 0 (sockpool \`--workers 1\`, tokio one worker thread, mio one
thread); the load generator (\`sockpool bench --threads 1\`) runs on CPU 1; all traffic is on
127.0.0.1. Each run: a fresh server, $WARMUP warm-up, $DURATION measured; $ROUNDS round(s), scenarios
and servers interleaved; figures are medians. Messages are 64 bytes unless named otherwise, and
every reply is verified byte for byte.

Server CPU is user + system time from /proc/PID/stat over the measured window. "server CPU use"
near 100% means the server's core was saturated; "bench CPU use" is the load generator's share
of its own core. When mio-echo (the cheapest echo server possible on one core) goes faster than
another server under the same load, the load generator was not what limited that server.
sockpool runs with its metrics endpoint on (not scraped) unless the scenario says otherwise.

Scenarios: \`echo-pp-N\` echo ping-pong over N connections; \`ack-pp-16\` ack-line ping-pong;
\`ack-pipe16-16\` ack-line with 16 requests outstanding per connection; \`echo-pp-64-hold$HOLD\`
as echo-pp-64 with $HOLD idle connections held open; \`churn-8\` 8 clients each doing connect,
one message, close (msgs/s and CPU/msg are per connection); \`session-8\` 8 clients each doing
connect, 5 ping-pong messages, close (the tutorial client's pattern; msgs/s and CPU/msg are per
message, the first one's latency includes the connect); \`metrics-scraped-pp-64\` /metrics
scraped every second vs \`--no-metrics\`; \`bulk-64k-4\` 64 KiB echo ping-pong over 4
connections (see MB/s).

$TABLE

$CHART_MD

Raw results (one \`sockpool bench --json\` object per run): \`$RESULTS_REL\`.
EOF_MD
    # Hand-written analysis of the figures, kept across runs.
    if [ -f "$ROOT/bench/analysis.md" ]; then
        echo
        cat "$ROOT/bench/analysis.md"
    fi
} > "$OUT"
echo "wrote $OUT" >&2
cat "$OUT"
