#!/usr/bin/env bash
# Speed of the storage plugin against the original Python storage service
# (commissaire-service e09a8cf with the commissaire library 95c4a1e), by
# hand, not in CI: both on the same RabbitMQ and the same private etcd,
# alternately, ROUNDS rounds; each measured by loadgen with `storage.get`
# and `storage.save` of Hosts at concurrency 1 and 32. Prints every figure
# and the ratio host/original per round, then the medians.
#
#   scripts/bench-storage.sh [ROUNDS] [REQUESTS]
#
# The original runs from a copy outside this repository, ORIG (default
# /tmp/commissaire-orig): its sources under ORIG/src, a venv with kombu,
# python-etcd and requests from PyPI under ORIG/venv. Both are made when
# missing: the sources cloned from GitHub (COMMISSAIRE_SERVICE_GIT,
# COMMISSAIRE_GIT to clone from elsewhere), never copied into the
# repository. The original is one process, as it is deployed; the host
# runs with its defaults and `concurrency = 64`.
#
# Each side gets its own exchange (the original declares a server-named
# queue that would otherwise keep receiving the host's requests), deleted
# at the end with its queues. HostCreds would need custodia; the benchmark
# stores Hosts (etcd only), so custodia is not started.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
requests=${2:-2000}
warmup=$((requests / 10))
keys=500
uri=${COMMISSAIRE_BENCH_AMQP:-amqp://guest:guest@127.0.0.1:5672/%2f}
kombu_uri=${uri/%\%2f//}
orig=${ORIG:-/tmp/commissaire-orig}
service_commit=e09a8cf
library_commit=95c4a1e
tag=$$
ex_orig=bench-storage-orig-$tag
ex_host=bench-storage-host-$tag

scripts/ensure-brokers.sh
cargo build -q --release -p commissaire-host -p commissaire-plugin-storage -p commissaire-bench

# The original: sources at its commits and a venv, outside the repository.
if [ ! -d "$orig/src/service/commissaire_service" ] || [ ! -d "$orig/src/lib/commissaire" ]; then
  mkdir -p "$orig/src/service" "$orig/src/lib"
  for pair in "${COMMISSAIRE_SERVICE_GIT:-https://github.com/projectatomic/commissaire-service}:$service_commit:service" \
              "${COMMISSAIRE_GIT:-https://github.com/projectatomic/commissaire}:$library_commit:lib"; do
    repo=${pair%:*:*} rest=${pair#"$repo":} commit=${rest%%:*} into=${rest#*:}
    git clone -q "$repo" "$orig/git-$into"
    git -C "$orig/git-$into" archive "$commit" src | tar -x -C "$orig/src/$into" --strip-components=1
  done
fi
if [ ! -x "$orig/venv/bin/python" ]; then
  python3 -m venv "$orig/venv"
  "$orig/venv/bin/pip" install -q kombu python-etcd requests
fi
py=$orig/venv/bin/python
export PYTHONPATH=$orig/src/service:$orig/src/lib

work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; scripts/etcd.sh down "$work/etcd" >/dev/null 2>&1 || true; cleanup; rm -rf "$work"' EXIT
etcd_url=$(scripts/etcd.sh up "$work/etcd")

# Deletes what each side declared on its exchange (queues bound there, the
# exchanges themselves).
cleanup() {
  for ex in "$ex_orig" "$ex_host"; do
    for q in $(rabbitmqctl -q list_bindings source_name destination_name 2>/dev/null |
               awk -F'\t' -v ex="$ex" '$1 == ex {print $2}' | sort -u); do
      rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
    done
    "$py" - "$kombu_uri" "$ex" <<'PY' 2>/dev/null || true
import sys, kombu
with kombu.Connection(sys.argv[1]) as conn:
    kombu.Exchange(sys.argv[2], type="topic")(conn.default_channel).delete()
PY
  done
}

handlers="[{\"type\": \"etcd\", \"server_url\": \"$etcd_url\", \"models\": [\"*\"]}]"
echo "{\"storage_handlers\": $handlers, \"debug\": false}" > "$work/storage.conf"
mkdir -p "$work/plugins"
cp target/release/libstorage.so "$work/plugins/"
cat > "$work/host.toml" <<TOML
[bus]
exchange = "$ex_host"
[plugins]
dir = "$work/plugins"
[[service]]
name = "storage"
queues = [{ name = "bench-storage-$tag", routing_key = "storage.*" }]
concurrency = 64
config = { storage_handlers = $(echo "$handlers" | sed 's/"\([a-z_]*\)": /\1 = /g') }
TOML

# Waits until the log file $1 says $2, 20 s at most.
wait_ready() {
  for _ in $(seq 1 400); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
  echo "bench-storage.sh: not ready: $(cat "$1")" >&2
  return 1
}

get='{"model_type_name": "Host", "model_json_data": {"address": "10.9.{i}.1"}}'
save='{"model_type_name": "Host", "model_json_data": {"address": "10.9.{i}.1", "status": "active", "os": "fedora", "cpus": 2, "memory": 4096, "space": 100000}}'

load() { # exchange concurrency routing-key params requests warmup
  target/release/loadgen --bus-uri "$uri" --exchange "$1" --concurrency "$2" \
    --routing-key "$3" --params "$4" --keys "$keys" --requests "$5" --warmup "$6" --json
}

measure() { # label exchange
  for method in get save; do
    local params=$get
    [ "$method" = save ] && params=$save
    for c in 1 32; do
      echo "$1 $method $(load "$2" "$c" "storage.$method" "$params" "$requests" "$warmup")"
    done
  done
}

start_original() {
  "$py" -c 'import sys; from commissaire_service.storage import main; sys.argv[0] = "commissaire-storage-service"; main()' \
    --bus-uri "$kombu_uri" --bus-exchange "$ex_orig" --config-file "$work/storage.conf" 2> "$work/orig.log" &
  pid=$!
  # Ready once it answers.
  for _ in $(seq 1 100); do
    if target/release/commissaire-host call storage.list_store_handlers --bus-uri "$uri" \
         --bus-exchange "$ex_orig" --timeout 1 >/dev/null 2>&1; then return 0; fi
    kill -0 "$pid" 2>/dev/null || { echo "bench-storage.sh: the original exited: $(cat "$work/orig.log")" >&2; return 1; }
  done
  echo "bench-storage.sh: the original does not answer: $(cat "$work/orig.log")" >&2
  return 1
}

start_host() {
  COMMISSAIRE_LOG=warn,commissaire_host::supervise=info target/release/commissaire-host run \
    --config "$work/host.toml" --bus-uri "$uri" 2> "$work/host.log" &
  pid=$!
  wait_ready "$work/host.log" "every service is consuming"
}

results=$work/results
# The hosts every `get` reads, stored once through the host.
start_host
load "$ex_host" 32 storage.save "$save" "$keys" 0 > /dev/null
kill -TERM "$pid"; wait "$pid" || true

for r in $(seq 1 "$rounds"); do
  start_original
  measure "$r original" "$ex_orig" | tee -a "$results"
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
  start_host
  measure "$r host" "$ex_host" | tee -a "$results"
  kill -TERM "$pid"; wait "$pid" || true
done

date -u +"%Y-%m-%d %H:%M UTC, $(nproc) cores, $rounds rounds of $requests requests (+$warmup warm-up)"
python3 - "$results" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    rnd, who, method, js = line.split(" ", 3)
    d = json.loads(js)
    rows.setdefault((method, d["concurrency"], int(rnd)), {})[who] = d
print("method  c   round  original req/s  host req/s  ratio   original p50 ms  host p50 ms  errors orig/host")
ratios = {}
for (method, c, rnd), d in sorted(rows.items()):
    o, h = d["original"], d["host"]
    t = h["rps"] / o["rps"]
    ratios.setdefault((method, c), []).append(t)
    print(f"{method:<7} {c:<3} {rnd:>5}  {o['rps']:>14.0f}  {h['rps']:>10.0f}  {t:>5.1f}   {o['p50_ms']:>15.2f}  {h['p50_ms']:>11.2f}  {o['errors']}/{h['errors']}")
for (method, c), t in sorted(ratios.items()):
    print(f"median storage.{method} c={c}: throughput host/original {statistics.median(t):.1f}")
PY
