#!/usr/bin/env bash
# Where a request's time goes inside the server at one request in flight:
# from the recvfrom that brings a delivery to the sendto of its reply,
# with the thread hand-offs between them, for the reference
# (bench/src/reference.rs) and the host (worker process, libsimple.so,
# workers = 1), one after the other, from kernel tracepoints (perf record
# -e syscalls:…, sched:sched_switch; needs root or perf_event_paranoid
# <= 1). Wall times on a shared machine move; the counts of hand-offs
# per request do not.
#
#   scripts/request-hops.sh [REQUESTS]      (default 5000)
#
# Prints, per server: the recv→send interval (p10, p50, p90, mean, in µs)
# and the events between per request, on the receiving thread ("same") or
# another ("other"): a futex call or sched_switch on another thread is a
# hand-off. HOPS_TIMELINE=N also prints N sample requests event by event.
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-5000}
uri=${COMMISSAIRE_BENCH_AMQP:-amqp://guest:guest@127.0.0.1:5672/%2f}
exchange=bench
queue=bench-simple

command -v perf >/dev/null || { echo "request-hops.sh: needs perf" >&2; exit 1; }
scripts/ensure-brokers.sh
source scripts/lib/bench-host.sh

for server in reference host; do
  if [ "$server" = reference ]; then
    target/release/reference --bus-uri "$uri" --exchange "$exchange" --queue "$queue" \
      --prefetch 64 2> "$work/server.log" &
    pid=$!; wait_ready "$work/server.log" "ready"; traced=$pid
  else
    COMMISSAIRE_LOG=warn,commissaire_host::supervise=info target/release/commissaire-host run \
      --config "$work/host.toml" --bus-uri "$uri" 2> "$work/server.log" &
    pid=$!; wait_ready "$work/server.log" "every service is consuming"; traced=$(pgrep -P "$pid")
  fi
  target/release/loadgen --bus-uri "$uri" --exchange "$exchange" --concurrency 1 \
    --requests 500 --warmup 0 --json > /dev/null
  perf record -q -o "$work/perf.data" -e syscalls:sys_exit_recvfrom -e syscalls:sys_enter_sendto \
    -e syscalls:sys_enter_write -e syscalls:sys_enter_futex -e syscalls:sys_exit_epoll_wait \
    -e syscalls:sys_enter_pwrite64 -e sched:sched_switch -p "$traced" 2> /dev/null &
  perf_pid=$!
  sleep 1
  echo "$server: $(target/release/loadgen --bus-uri "$uri" --exchange "$exchange" --concurrency 1 \
    --requests "$requests" --warmup 0)"
  kill -INT "$perf_pid"; wait "$perf_pid" || true
  perf script -i "$work/perf.data" -F tid,time,event,trace 2> /dev/null > "$work/events.$server"
  kill -TERM "$pid"; wait "$pid" || true
done

python3 - "$work/events.reference" "$work/events.host" "${HOPS_TIMELINE:-0}" <<'PY'
import collections, re, statistics, sys

def events(path):
    out = []
    for line in open(path):
        m = re.match(r"\s*(\d+)\s+([\d.]+):\s+\S+?:(\S+):\s*(.*)", line)
        if m:
            out.append((float(m.group(2)), int(m.group(1)), m.group(3), m.group(4)))
    return sorted(out)

def delivered(e):
    # A recvfrom that returned bytes (an error is a negative, shown as 0xfff…).
    return e[2] == "sys_exit_recvfrom" and not e[3].startswith("0xfff")

samples = int(sys.argv[3])
for path in sys.argv[1:3]:
    ev = events(path)
    gaps, between, n, i = [], collections.Counter(), 0, 0
    starts = []
    while i < len(ev):
        if not delivered(ev[i]):
            i += 1
            continue
        j, seen = i + 1, collections.Counter()
        while j < len(ev) and ev[j][2] != "sys_enter_sendto" and not delivered(ev[j]):
            seen[f"{ev[j][2]}@{'same' if ev[j][1] == ev[i][1] else 'other'}"] += 1
            j += 1
        if j < len(ev) and ev[j][2] == "sys_enter_sendto":
            gaps.append((ev[j][0] - ev[i][0]) * 1e6)
            between.update(seen)
            starts.append((i, j))
            n += 1
        i = max(j, i + 1)
    if not n:
        print(f"{path.rsplit('.', 1)[1]}: no request seen")
        continue
    gaps.sort()
    q = lambda p: gaps[int(p * (len(gaps) - 1))]
    print(f"{path.rsplit('.', 1)[1]}: {n} requests, recv→reply send µs: p10 {q(.1):.0f}, p50 {q(.5):.0f},"
          f" p90 {q(.9):.0f}, mean {statistics.mean(gaps):.0f}; between them, per request:")
    for k, v in sorted(between.items(), key=lambda kv: -kv[1]):
        print(f"  {v / n:5.2f} {k}")
    for s in range(samples):
        i, j = starts[(s + 1) * len(starts) // (samples + 1)]
        print("  --- sample")
        for t, tid, name, rest in ev[i:j + 1]:
            print(f"  {(t - ev[i][0]) * 1e6:7.1f} µs  tid {tid}  {name:<20} {rest[:70]}")
PY
