#!/usr/bin/env bash
# A/B benchmark on Redis: a Python kombu service doing what CommissaireService
# does (tests/python/redis_service.py quiet: ConsumerMixin, replies by
# reply_to on the default exchange, then acks) and commissaire-host serving
# libsimple.so, alternately, ROUNDS rounds, each measured by loadgen at
# concurrency 1 and 32 on the same Redis. Prints every figure, the ratio
# host/kombu per round and the medians.
#
# Then what the host asks of Redis: the commands the host and loadgen send
# per request (MONITOR, at c=1 and c=32), Redis's time per command (INFO
# commandstats), and the bound Redis's own CPU per request sets: one core
# saturates at 1/that.
#
#   scripts/bench-redis.sh [ROUNDS] [REQUESTS]
#
# COMMISSAIRE_BENCH_REDIS: the Redis database (default
# redis://127.0.0.1:6379/2); it must be used by nothing else: the bench
# deletes the transport's keys in it.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
requests=${2:-10000}
uri=${COMMISSAIRE_BENCH_REDIS:-redis://127.0.0.1:6379/2}
db=${uri##*/}; db=${db%%\?*}; db=${db:-0}
hostport=${uri#redis://}; hostport=${hostport%%/*}; hostport=${hostport##*@}
rhost=${hostport%%:*}; rport=${hostport##*:}; [ "$rport" = "$hostport" ] && rport=6379
exchange=bench-redis
queue=bench-redis-simple
python=${COMMISSAIRE_TEST_PYTHON:-$PWD/.venv/bin/python}
rcli() { redis-cli -h "$rhost" -p "$rport" -n "$db" "$@"; }

scripts/ensure-brokers.sh
if ! "$python" -c 'import kombu.transport.redis, redis' 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install -q 'kombu[redis]>=5.3,<6'
  python=$PWD/.venv/bin/python
fi
source scripts/lib/bench-host.sh

clean() { rcli del unacked unacked_index unacked_mutex > /dev/null; }

# CPU time (clock ticks) of process $1 and its children, and of Redis.
ticks() { cat "/proc/$1/stat" $(pgrep -P "$1" | sed 's|.*|/proc/&/stat|') 2>/dev/null | awk '{t += $14 + $15} END {print t}'; }
broker_ticks() { cat $(pgrep -x redis-server | sed 's|.*|/proc/&/stat|') 2>/dev/null | awk '{t += $14 + $15} END {print t}'; }
hz=$(getconf CLK_TCK)

loadgen() { # concurrency requests warmup
  target/release/loadgen --bus-uri "$uri" --exchange "$exchange" --concurrency "$1" \
    --requests "$2" --warmup "$3" --json
}

measure() { # label server-pid
  for c in 1 32; do
    local s0 b0 line s1 b1
    s0=$(ticks "$2"); b0=$(broker_ticks)
    line=$(loadgen "$c" "$requests" 1000)
    s1=$(ticks "$2"); b1=$(broker_ticks)
    # CPU microseconds per request (warm-up included), server and Redis.
    echo "$1 ${line%\}},\"server_cpu_us\":$(( (s1 - s0) * 1000000 / hz / (requests + 1000) )),\"broker_cpu_us\":$(( (b1 - b0) * 1000000 / hz / (requests + 1000) ))}"
  done
}

start_host() {
  COMMISSAIRE_LOG=warn,commissaire_host::supervise=info target/release/commissaire-host run \
    --config "$work/host.toml" --bus-uri "$uri" 2> "$work/host.log" &
  pid=$!; wait_ready "$work/host.log" "every service is consuming"
}

results="$work/results"
for r in $(seq 1 "$rounds"); do
  clean
  "$python" tests/python/redis_service.py quiet "$uri" "$exchange" "$queue=simple.*" > "$work/kombu.log" 2>&1 &
  pid=$!; wait_ready "$work/kombu.log" "ready"
  measure "$r kombu" "$pid" | tee -a "$results"
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true

  clean
  start_host
  measure "$r host" "$pid" | tee -a "$results"
  kill -TERM "$pid"; wait "$pid" || true
done

# What the host and loadgen send per request: MONITOR over a measured
# window at c=1 and at c=32.
clean
start_host
for c in 1 32; do
  # Redis's own time per command (MONITOR would slow every command).
  rcli info commandstats > "$work/stats0.$c"
  loadgen "$c" 2000 500 > /dev/null
  rcli info commandstats > "$work/stats1.$c"
  redis-cli -h "$rhost" -p "$rport" monitor > "$work/monitor.$c" &
  mon=$!
  sleep 0.2
  loadgen "$c" 2000 0 > /dev/null
  sleep 0.2
  kill "$mon"; wait "$mon" 2>/dev/null || true
done
kill -TERM "$pid"; wait "$pid" || true
clean

status=0
python3 - "$results" "$work" "$db" 2000 "$requests" "$rhost" "$rport" <<'PY' || status=$?
import json, re, statistics, subprocess, sys
results, work, db, monitored, requests, rhost, rport = sys.argv[1:8]
monitored, requests = int(monitored), int(requests)

rows = {}
for line in open(results):
    rnd, who, js = line.split(" ", 2)
    d = json.loads(js)
    rows.setdefault((int(rnd), d["concurrency"]), {})[who] = d
print()
print("host / kombu service (redis_service.py quiet)")
print("round  c   kombu req/s  host req/s  ratio    kombu p50 ms  host p50 ms    CPU µs/req server kombu/host, redis kombu/host")
ratios = {1: [], 32: []}
host_rps = {1: [], 32: []}
for (rnd, c), d in sorted(rows.items()):
    if "kombu" not in d or "host" not in d:
        continue
    k, h = d["kombu"], d["host"]
    t = h["rps"] / k["rps"]
    ratios[c].append(t); host_rps[c].append(h["rps"])
    print(f"{rnd:>5}  {c:<3} {k['rps']:>11.0f}  {h['rps']:>10.0f}  {t:>5.2f}    {k['p50_ms']:>12.3f}  {h['p50_ms']:>11.3f}"
          f"    {k['server_cpu_us']:>4}/{h['server_cpu_us']:<4}  {k['broker_cpu_us']:>4}/{h['broker_cpu_us']:<4}")
for c, t in ratios.items():
    if t:
        print(f"median c={c}: throughput host/kombu {statistics.median(t):.2f}")

# MONITOR lines: `<time> [<db> <client>] "CMD" "arg" ...`, C-escaped.
ESC = {'n': b'\n', 'r': b'\r', 't': b'\t', 'a': b'\a', 'b': b'\b', '\\': b'\\', '"': b'"'}
def unescape(s):
    out, i = bytearray(), 0
    while i < len(s):
        ch = s[i]
        if ch == '\\' and i + 1 < len(s):
            nxt = s[i + 1]
            if nxt == 'x':
                out += bytes([int(s[i + 2:i + 4], 16)]); i += 4; continue
            out += ESC.get(nxt, nxt.encode()); i += 2; continue
        out += ch.encode('utf-8', 'surrogateescape'); i += 1
    return bytes(out)

def commands(path):
    for line in open(path, encoding='utf-8', errors='surrogateescape'):
        m = re.match(r'^[\d.]+ \[(\d+) ([^\]]+)\] (.*)$', line.rstrip('\n'))
        if not m or m.group(1) != db or m.group(2) == 'lua':
            continue
        yield [unescape(a) for a in re.findall(r'"((?:[^"\\]|\\.)*)"', m.group(3))]

def kind(cmd):
    name = cmd[0].upper()
    if name == b'EVALSHA':
        keys = cmd[3:3 + int(cmd[2])]
        if keys[:1] == [b'unacked']:
            return 'take'
        if keys[1:2] == [b'unacked']:
            return 'reply+ack'
        return 'publish'
    return name.decode()

def stats(path):
    out = {}
    for line in open(path):
        m = re.match(r'cmdstat_(\w+):calls=(\d+),usec=(\d+)', line)
        if m:
            out[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return out

mixes = {}
for c in (1, 32):
    seen, first = {}, {}
    for cmd in commands(f"{work}/monitor.{c}"):
        k = kind(cmd)
        seen[k] = seen.get(k, 0) + 1
        first.setdefault(k, cmd)
    total = sum(seen.values())
    print()
    print(f"round trips per request at c={c} (MONITOR, {monitored} requests): {total / monitored:.2f}")
    for k, n in sorted(seen.items(), key=lambda kv: -kv[1]):
        if n >= monitored / 100:
            print(f"  {k:<10} {n / monitored:.2f}")
    s0, s1 = stats(f"{work}/stats0.{c}"), stats(f"{work}/stats1.{c}")
    window = monitored + 500
    print(f"  Redis commandstats over {window} requests without MONITOR (whole server; EVALSHA's time includes its scripts' commands, also listed):")
    for name, (calls, usec) in sorted(s1.items(), key=lambda kv: -(kv[1][1] - s0.get(kv[0], (0, 0))[1])):
        dc, du = calls - s0.get(name, (0, 0))[0], usec - s0.get(name, (0, 0))[1]
        if dc >= window / 100:
            print(f"    {name:<10} {dc / window:>5.2f} calls/req  {du / window:>6.1f} µs/req")
    mixes[c] = (seen, first)

# The bound: Redis runs its commands on one core, so its CPU time per
# request (the whole redis-server process) bounds what this mix can reach.
cpu = [d["host"]["broker_cpu_us"] for (rnd, c), d in rows.items() if c == 32 and "host" in d]
if cpu and host_rps[32]:
    us, host = statistics.median(cpu), statistics.median(host_rps[32])
    bound = 1e6 / max(us, 1)
    print()
    print(f"bound: Redis's CPU per request at c=32, {us} µs (median): one core saturates at about "
          f"{bound:.0f} req/s, {bound / host:.1f}x the host's {host:.0f} req/s")
PY
# What the run left: its lists and records.
clean
for pattern in "*$queue*" "_kombu.binding*.$exchange" '*commissaire-host-reply*' 'commissaire-host.held.*'; do
  rcli --scan --pattern "$pattern" | xargs -r -d '\n' redis-cli -h "$rhost" -p "$rport" -n "$db" del > /dev/null
done
exit "$status"
