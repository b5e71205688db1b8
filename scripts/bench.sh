#!/usr/bin/env bash
# A/B benchmark on RabbitMQ: the reference lapin service (bench/src/reference.rs)
# and commissaire-host serving libsimple.so (VARIANTS: host = the defaults,
# workers = 1; host-w2 = workers = 2; host-confirm = confirm_replies = true;
# host-handover = inline_handlers = false; host-inline = inline_handlers =
# true; host-ack0 = ack_window_us = 0, each request acked on its own;
# host-async = the defaults, calling `simple.add_async`, the same sum as an
# async handler),
# alternately, ROUNDS rounds, each measured by loadgen at concurrency 1 and 32
# on the same broker. Prints every figure, the ratio host/reference per round,
# and the median ratios. BASE_BIN=path adds the variant `base`: that
# binary (another build of commissaire-host) on host.toml, for an A/B of
# two builds in the same run.
#   scripts/bench.sh [ROUNDS] [REQUESTS]      [VARIANTS="host host-w2"] [BASE_BIN=…]
# BUS=redis: the Redis benchmark instead (scripts/bench-redis.sh: the host
# against a kombu service, and the Redis ceiling).
set -euo pipefail
if [ "${BUS:-amqp}" = redis ]; then
  exec "$(dirname "$0")/bench-redis.sh" "$@"
fi
cd "$(dirname "$0")/.."
rounds=${1:-3}
requests=${2:-20000}
uri=${COMMISSAIRE_BENCH_AMQP:-amqp://guest:guest@127.0.0.1:5672/%2f}
exchange=bench
queue=bench-simple

scripts/ensure-brokers.sh
source scripts/lib/bench-host.sh
sed 's/^concurrency = 64$/concurrency = 64\nworkers = 2/' "$work/host.toml" > "$work/host-w2.toml"
sed 's/^\[bus\]$/[bus]\nconfirm_replies = true/' "$work/host.toml" > "$work/host-confirm.toml"
sed 's/^concurrency = 64$/concurrency = 64\ninline_handlers = false/' "$work/host.toml" > "$work/host-handover.toml"
sed 's/^concurrency = 64$/concurrency = 64\ninline_handlers = true/' "$work/host.toml" > "$work/host-inline.toml"
sed 's/^\[bus\]$/[bus]\nack_window_us = 0/' "$work/host.toml" > "$work/host-ack0.toml"


# CPU time (clock ticks) of process $1 and its children, and of the broker.
ticks() { cat "/proc/$1/stat" $(pgrep -P "$1" | sed 's|.*|/proc/&/stat|') 2>/dev/null | awk '{t += $14 + $15} END {print t}'; }
broker_ticks() { cat $(pgrep -f beam.smp | sed 's|.*|/proc/&/stat|') 2>/dev/null | awk '{t += $14 + $15} END {print t}'; }
hz=$(getconf CLK_TCK)

measure() { # label server-pid [routing-key]
  for c in 1 32; do
    local s0 b0 line s1 b1
    s0=$(ticks "$2"); b0=$(broker_ticks)
    line=$(target/release/loadgen --bus-uri "$uri" --exchange "$exchange" --concurrency "$c" \
      --routing-key "${3:-simple.add}" --requests "$requests" --warmup 2000 --json)
    s1=$(ticks "$2"); b1=$(broker_ticks)
    # CPU microseconds per request (warm-up included), server and broker.
    echo "$1 ${line%\}},\"server_cpu_us\":$(( (s1 - s0) * 1000000 / hz / (requests + 2000) )),\"broker_cpu_us\":$(( (b1 - b0) * 1000000 / hz / (requests + 2000) ))}"
  done
}

results="$work/results"
for r in $(seq 1 "$rounds"); do
  target/release/reference --bus-uri "$uri" --exchange "$exchange" --queue "$queue" --prefetch 64 2> "$work/ref.log" &
  pid=$!; wait_ready "$work/ref.log" "ready"
  measure "$r reference" "$pid" | tee -a "$results"
  kill "$pid"; wait "$pid" 2>/dev/null || true

  # `base` runs once a round, whether or not VARIANTS names it too.
  for variant in $(printf '%s\n' ${VARIANTS:-host host-w2} | grep -vx base) ${BASE_BIN:+base}; do
    bin=target/release/commissaire-host config=$variant key=simple.add
    if [ "$variant" = base ]; then bin=$BASE_BIN config=host; fi
    if [ "$variant" = host-async ]; then config=host key=simple.add_async; fi
    # (`supervisor`: the module's name in older builds.)
    COMMISSAIRE_LOG=warn,commissaire_host::supervise=info,commissaire_host::supervisor=info "$bin" run \
      --config "$work/$config.toml" --bus-uri "$uri" 2> "$work/host.log" &
    pid=$!; wait_ready "$work/host.log" "every service is consuming"
    measure "$r $variant" "$pid" "$key" | tee -a "$results"
    kill -TERM "$pid"; wait "$pid" || true
  done
done

python3 - "$results" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    rnd, who, js = line.split(" ", 2)
    d = json.loads(js)
    rows.setdefault((int(rnd), d["concurrency"]), {})[who] = d
for variant, label in (("host", "workers = 1"), ("host-w2", "workers = 2"),
                       ("host-confirm", "workers = 1, confirm_replies = true"),
                       ("host-handover", "workers = 1, inline_handlers = false"),
                       ("host-inline", "workers = 1, inline_handlers = true"),
                       ("host-ack0", "workers = 1, ack_window_us = 0"),
                       ("host-async", "workers = 1, simple.add_async (an async handler)"),
                       ("base", "workers = 1, the BASE_BIN build")):
    if not any(variant in d for d in rows.values()):
        continue
    print()
    print(f"host with {label}")
    print("round  c   reference req/s  host req/s  ratio    ref p50 ms  host p50 ms  ratio    CPU µs/req server ref/host, broker ref/host")
    ratios = {1: ([], [], []), 32: ([], [], [])}
    for (rnd, c), d in sorted(rows.items()):
        if variant not in d:
            continue
        ref, host = d["reference"], d[variant]
        t = host["rps"] / ref["rps"]; l = host["p50_ms"] / ref["p50_ms"]
        cpu = (host["server_cpu_us"] + host["broker_cpu_us"]) / max(1, ref["server_cpu_us"] + ref["broker_cpu_us"])
        ratios[c][0].append(t); ratios[c][1].append(l); ratios[c][2].append(cpu)
        print(f"{rnd:>5}  {c:<3} {ref['rps']:>15.0f}  {host['rps']:>10.0f}  {t:>5.2f}    {ref['p50_ms']:>10.3f}  {host['p50_ms']:>11.3f}  {l:>5.2f}"
              f"    {ref['server_cpu_us']:>3}/{host['server_cpu_us']:<3}  {ref['broker_cpu_us']:>3}/{host['broker_cpu_us']:<3}")
    for c, (t, l, cpu) in ratios.items():
        if t:
            print(f"median c={c}: throughput host/reference {statistics.median(t):.2f}, p50 latency host/reference {statistics.median(l):.2f}, "
                  f"CPU per request (server + broker) host/reference {statistics.median(cpu):.2f}")
PY

python3 - "$results" <<'PY'
# host/base per round, when BASE_BIN ran: the A/B of two builds.
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    rnd, who, js = line.split(" ", 2)
    d = json.loads(js)
    rows.setdefault(d["concurrency"], []).append((int(rnd), who, d))
for c, entries in sorted(rows.items()):
    by_round = {}
    for rnd, who, d in entries:
        by_round.setdefault(rnd, {})[who] = d
    t = [r["host"]["rps"] / r["base"]["rps"] for r in by_round.values() if "host" in r and "base" in r]
    if t:
        print(f"c={c}: throughput host/base per round {' '.join(f'{x:.3f}' for x in t)}, median {statistics.median(t):.3f}")
PY
