# Sourced by the benchmark scripts (bench.sh, bench-redis.sh,
# metrics-cost.sh), from the repository root, with `exchange` and `queue`
# set: builds the release host, libsimple.so and loadgen, and makes `work`,
# a directory removed at exit (with every background job killed), holding
# the plugin and `host.toml`, which serves `simple` on that exchange and
# queue.

cargo build -q --release -p commissaire-host -p commissaire-plugin-simple -p commissaire-bench
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/plugins"
cp target/release/libsimple.so "$work/plugins/"
cat > "$work/host.toml" <<TOML
[bus]
exchange = "$exchange"
[plugins]
dir = "$work/plugins"
[[service]]
name = "simple"
queues = [{ name = "$queue", routing_key = "simple.*" }]
concurrency = 64
TOML

# Waits until the log file $1 says $2, $3 seconds at most (default 10).
wait_ready() {
  local tries=$((${3:-10} * 20))
  for _ in $(seq 1 "$tries"); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
  echo "$(basename "$0"): not ready: $(cat "$1")" >&2
  return 1
}
