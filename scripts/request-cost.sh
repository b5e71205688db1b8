#!/usr/bin/env bash
# Instructions per request, the host against the reference, in one run:
# the release host serving libsimple.so (workers = 1; worker plus
# supervisor) and bench/src/reference.rs (the hand-written lapin service)
# each run under valgrind's callgrind while loadgen sends REQUESTS requests
# at c=32 and REQUESTS_C1 at c=1 on RabbitMQ. Callgrind counts
# instructions, not seconds: the one figure the neighbours of a shared
# 2-core machine do not move.
#
#   scripts/request-cost.sh [REQUESTS] [REQUESTS_C1]     (default 5000, 2000)
#   SERVERS="reference host host-async" scripts/request-cost.sh
#
# host-async: the same host, called on `simple.add_async` (the same sum
# as an async handler): what the async path costs against the sync one.
# BASE_BIN=path/to/commissaire-host adds the server `base`: that build,
# with the libsimple.so beside it, for an A/B of two builds in one run.
#
# Counted: only the measured window. Each server gets WARMUP requests
# first, then its counters are zeroed (`callgrind_control -z`), loadgen
# sends the requests, and the counters are dumped (`callgrind_control -d`):
# start-up, warm-up and shut-down are left out. Then, with no load, the
# counters are zeroed again and dumped after IDLE seconds: what each
# process does on its own per second (the worker's watchdog and reports,
# the supervisor reading them; the reference has none). Under callgrind a
# request takes about 50 times as long, so that background work weighs
# far more per request than at full speed: the table shows the count
# with it ("in all") and without it ("load"), the rate times the window
# taken off. The cost claim is on "in all" (the stricter one).
#
# CALLGRIND_DIR=dir keeps the window's profiles (cost.<server>.c<C>.<role>)
# for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-5000}
requests_c1=${2:-2000}
warmup=${WARMUP:-300}
idle=${IDLE:-5}
uri=${COMMISSAIRE_BENCH_AMQP:-amqp://guest:guest@127.0.0.1:5672/%2f}
exchange=bench
queue=bench-simple

command -v valgrind >/dev/null || { echo "request-cost.sh: needs valgrind (apt-get install valgrind)" >&2; exit 1; }
scripts/ensure-brokers.sh
source scripts/lib/bench-host.sh

# The valgrind'd processes of server $1: itself and its children.
server_pids() { echo "$1" $(pgrep -P "$1" || true); }

# Runs `callgrind_control $1` on every process of server $2.
control() {
  local p
  for p in $(server_pids "$2"); do callgrind_control "$1" "$p" >/dev/null 2>&1; done
}

results="$work/results"
: > "$results"
if [ -n "${BASE_BIN:-}" ]; then
  mkdir -p "$work/base-plugins"
  cp "$(dirname "$BASE_BIN")/libsimple.so" "$work/base-plugins/"
  sed "s|^dir = .*|dir = \"$work/base-plugins\"|" "$work/host.toml" > "$work/base.toml"
fi
for server in ${SERVERS:-reference host} ${BASE_BIN:+base}; do
  key=simple.add; [ "$server" = host-async ] && key=simple.add_async
  bin=target/release/commissaire-host config=$work/host.toml
  [ "$server" = base ] && bin=$BASE_BIN config=$work/base.toml
  for c in 32 1; do
    n=$requests; [ "$c" = 1 ] && n=$requests_c1
    rm -f "$work"/cg.*
    if [ "$server" = reference ]; then
      valgrind -q --tool=callgrind --compress-strings=no --callgrind-out-file="$work/cg.%p" \
        target/release/reference --bus-uri "$uri" --exchange "$exchange" --queue "$queue" \
        --prefetch 64 2> "$work/server.log" &
      pid=$!; wait_ready "$work/server.log" "ready" 60
    else
      COMMISSAIRE_LOG=warn,commissaire_host::supervise=info \
        valgrind -q --tool=callgrind --compress-strings=no --trace-children=yes --callgrind-out-file="$work/cg.%p" \
        "$bin" run --config "$config" --bus-uri "$uri" 2> "$work/server.log" &
      pid=$!; wait_ready "$work/server.log" "every service is consuming" 60
    fi
    target/release/loadgen --bus-uri "$uri" --exchange "$exchange" --concurrency "$c" \
      --routing-key "$key" --requests "$warmup" --warmup 0 --json > /dev/null
    control -z "$pid"
    started=$(date +%s.%N)
    target/release/loadgen --bus-uri "$uri" --exchange "$exchange" --concurrency "$c" \
      --routing-key "$key" --requests "$n" --warmup 0 --json > "$work/load.json"
    control -d "$pid"
    window=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN {print b - a}')
    control -z "$pid"
    sleep "$idle"
    control -d "$pid"
    for p in $(server_pids "$pid"); do
      # The first dump is the window, the second the idle seconds.
      role=$(grep -a -m1 '^cmd:' "$work/cg.$p.1" | grep -q ' worker' && echo worker || echo main)
      [ "$server" != reference ] && [ "$role" = main ] && role=supervisor
      [ "$server" = reference ] && role=reference
      echo "$server $c $n $window $role $(grep -a -m1 '^summary:' "$work/cg.$p.1" | cut -d' ' -f2) $(grep -a -m1 '^summary:' "$work/cg.$p.2" | cut -d' ' -f2) $(cat "$work/load.json")" >> "$results"
      if [ -n "${CALLGRIND_DIR:-}" ]; then
        mkdir -p "$CALLGRIND_DIR" && cp "$work/cg.$p.1" "$CALLGRIND_DIR/cost.$server.c$c.$role"
      fi
    done
    kill -TERM "$pid"; wait "$pid" || true
  done
done

python3 - "$results" "$idle" <<'PY'
import json, sys
idle = float(sys.argv[2])
rows = {}
for line in open(sys.argv[1]):
    server, c, n, window, role, ir, ir_idle, js = line.split(" ", 7)
    r = rows.setdefault((server, int(c)), {"n": int(n), "window": float(window), "roles": {}, "load": json.loads(js)})
    r["roles"][role] = (int(ir), int(ir_idle))
print("instructions per request, RabbitMQ, under callgrind (in all: the window's count / requests;"
      f" load: less each process's idle rate over {idle:.0f} s times the window)")
print(f"{'server':<10} {'c':>3} {'requests':>8} {'window s':>8}  {'process':<11} {'in all':>8} {'load':>8}  {'idle Ir/s':>10}")
totals = {}
for (server, c), r in sorted(rows.items(), key=lambda kv: (kv[0][1] != 32, kv[0][0])):
    n, w = r["n"], r["window"]
    t_all = t_load = 0.0
    for role, (ir, ir_idle) in sorted(r["roles"].items()):
        rate = ir_idle / idle
        per, load = ir / n, max(0.0, ir - rate * w) / n
        t_all += per; t_load += load
        print(f"{server:<10} {c:>3} {n:>8} {w:>8.1f}  {role:<11} {per:>8.0f} {load:>8.0f}  {rate:>10.0f}")
    totals[(server, c)] = (t_all, t_load)
    if len(r["roles"]) > 1:
        print(f"{server:<10} {c:>3} {n:>8} {w:>8.1f}  {'both':<11} {t_all:>8.0f} {t_load:>8.0f}")
print()
for c in (32, 1):
    for server, base in (("host", "reference"), ("host-async", "reference"), ("host-async", "host"),
                         ("base", "reference"), ("host", "base")):
        if (server, c) in totals and (base, c) in totals:
            h, ref = totals[(server, c)], totals[(base, c)]
            print(f"c={c:<2}: {server} {h[0]:.0f} / {base} {ref[0]:.0f} = {h[0] / ref[0]:.3f} in all;"
                  f" {h[1]:.0f} / {ref[1]:.0f} = {h[1] / ref[1]:.3f} load")
PY
