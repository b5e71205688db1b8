#!/usr/bin/env bash
# What counting for /metrics costs, in instructions: the release host
# serving libsimple.so (workers = 1) runs under valgrind's callgrind while
# loadgen sends REQUESTS requests at concurrency 32 on RabbitMQ. Callgrind
# counts instructions, not seconds, so the figures are the same whatever
# else the machine does, where a 2% difference in throughput is lost in
# the noise of a shared 2-core machine (scripts/bench.sh).
#
#   scripts/metrics-cost.sh [REQUESTS]      (default 5000)
#
# Counted as metrics: every instruction of the functions of host/src/metrics/
# and host/src/supervise/metrics.rs and of what they call, their lines
# inlined elsewhere (by the line tables) and what those call, and all the
# worker's periodic report (report_metrics) runs. What two of these reach
# may be counted twice. Not counted: code of other files inlined into a
# metrics function that was itself inlined (callgrind then names neither).
# Per request means per request sent, warm-up included; the process's own
# background work (the watchdog's ticks, reports) is spread over them and
# grows with valgrind's slowdown, so the share is a little understated. Prints instructions per request of the worker and the supervisor,
# and the share that is metrics. CALLGRIND_DIR=dir keeps the raw profiles
# there, for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-5000}
warmup=200
uri=${COMMISSAIRE_BENCH_AMQP:-amqp://guest:guest@127.0.0.1:5672/%2f}
exchange=bench
queue=bench-simple

command -v valgrind >/dev/null || { echo "metrics-cost.sh: needs valgrind (apt-get install valgrind)" >&2; exit 1; }
scripts/ensure-brokers.sh
source scripts/lib/bench-host.sh

COMMISSAIRE_LOG=warn,commissaire_host::supervise=info \
  valgrind -q --tool=callgrind --trace-children=yes \
  --callgrind-out-file="$work/callgrind.%p" \
  target/release/commissaire-host run --config "$work/host.toml" --bus-uri "$uri" 2> "$work/host.log" &
pid=$!
wait_ready "$work/host.log" "every service is consuming" 60
target/release/loadgen --bus-uri "$uri" --exchange "$exchange" --concurrency 32 \
  --requests "$requests" --warmup "$warmup" --json >&2
kill -TERM "$pid"; wait "$pid" || true
if [ -n "${CALLGRIND_DIR:-}" ]; then
  mkdir -p "$CALLGRIND_DIR" && cp "$work"/callgrind.* "$CALLGRIND_DIR"/
fi

python3 - "$((requests + warmup))" "$work"/callgrind.* <<'PY'
import re, sys

requests = int(sys.argv[1])
# Metrics code: its functions (with what they call) and its lines inlined
# elsewhere; the worker's periodic report, with what it calls.
METRICS_FN = re.compile(r"commissaire_host::(metrics|supervise::metrics)::")
METRICS_FILE = re.compile(r"host/src/(metrics/|supervise/metrics\.rs)")
REPORT_FN = re.compile(r"commissaire_host::serve::worker::report_(metrics|now)")

def read(path):
    """(command, total Ir, Ir of metrics on the request path, Ir reporting)."""
    names = {}
    def name(kind, rest):
        m = re.match(r"\((\d+)\)(?: (.*))?", rest)
        if not m:
            return rest
        key = (kind, m.group(1))
        if m.group(2) is not None:
            names[key] = m.group(2)
        return names.get(key, "")
    cmd, total, metrics, report = "", 0, 0, 0
    fl = cur = fn = cfn = ""
    after_call = False
    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        if line.startswith("cmd:"):
            cmd = line[4:].strip()
        elif line.startswith("fl="):
            fl = cur = name("fl", line[3:])
        elif line.startswith(("fi=", "fe=")):
            cur = name("fl", line[3:])
        elif line.startswith("fn="):
            fn, cur = name("fn", line[3:]), fl
        elif line.startswith(("cfl=", "cfi=")):
            name("fl", line[4:])
        elif line.startswith("cfn="):
            cfn = name("fn", line[4:])
        elif line.startswith(("ob=", "cob=")):
            name("ob", line.split("=", 1)[1])
        elif line.startswith("calls="):
            after_call = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            fields = line.split()
            ir = int(fields[1]) if len(fields) > 1 else 0
            if after_call:
                # A call's inclusive cost, counted for the caller's side when
                # the callee's own lines are not counted already.
                after_call = False
                if METRICS_FN.search(cfn) or REPORT_FN.search(cfn):
                    continue
                if REPORT_FN.search(fn):
                    report += ir
                elif METRICS_FN.search(fn) or METRICS_FILE.search(cur):
                    metrics += ir
                continue
            total += ir
            if REPORT_FN.search(fn):
                report += ir
            elif METRICS_FN.search(fn) or METRICS_FILE.search(cur):
                metrics += ir
    return cmd, total, metrics, report

rows = [read(p) for p in sys.argv[2:]]
print(f"instructions per request ({requests} requests, warm-up included, at c=32, RabbitMQ, workers = 1):")
grand, counted = 0, 0
for cmd, total, metrics, report in sorted(rows, key=lambda r: -r[1]):
    if " worker " in f" {cmd} ":
        role = "worker"
    elif " run " in f" {cmd} ":
        role = "supervisor"
    else:
        continue
    share = (metrics + report) / total if total else 0
    print(f"  {role:<10} {total / requests:>8.0f} in all; metrics {metrics / requests:>6.1f} counting"
          f" + {report / requests:>5.1f} reporting = {100 * share:.3f}%")
    grand += total
    counted += metrics + report
print(f"metrics in both processes: {100 * counted / grand:.3f}% of their instructions")
PY
