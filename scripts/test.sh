#!/usr/bin/env bash
# The test command: brokers up, Python test client ready, then the tests.
# With no arguments, every test of the workspace (unit tests, plugin tests,
# end-to-end tests against the real RabbitMQ, Redis and the real binary)
# and the plugin template's. Arguments go to `cargo test` and narrow the
# run, e.g.
#   scripts/test.sh -p commissaire-e2e --test cli
#   scripts/test.sh -p commissaire-host
# (`cargo test` without `-p` tests every member of this workspace.)
#
# Every test binary runs (`--no-fail-fast`) and every failure is listed at
# the end. The run keeps to itself, so that it may run beside another
# checkout's on the same machine: a scratch directory of its own as TMPDIR
# (the hosts note their reply queues there) and a Redis of its own
# (COMMISSAIRE_TEST_REDIS; set it to use another). RabbitMQ is shared, with
# names no other run uses; the tests that stop a broker start their own.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-brokers.sh

# kombu from PyPI, for the tests that play a Python Commissaire caller;
# prometheus_client, whose parser reads the /metrics scrapes; custodia, the
# secrets store the storage plugin keeps HostCreds in (the version
# Commissaire ran with).
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import kombu.transport.redis, redis, prometheus_client, custodia.server' 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install -q 'kombu[redis]>=5.3,<6' 'prometheus_client>=0.17,<1' 'custodia==0.5.0'
fi
export COMMISSAIRE_TEST_PYTHON="$PWD/.venv/bin/python"

scratch=$(mktemp -d "${TMPDIR:-/tmp}/commissaire-test.XXXXXX")
redis_pid=
cleanup() {
  if [ -n "$redis_pid" ]; then
    kill "$redis_pid" 2>/dev/null || true
    wait "$redis_pid" 2>/dev/null || true
  fi
  rm -rf "$scratch"
}
trap cleanup EXIT
mkdir -p "$scratch/tmp" "$scratch/redis"

# A Redis of this run's own, on a port free a moment ago: another process
# may take it first, and then redis-server exits and another port is tried.
if [ -z "${COMMISSAIRE_TEST_REDIS:-}" ]; then
  for _ in $(seq 1 20); do
    port=$((20000 + RANDOM % 40000))
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
      --dir "$scratch/redis" --logfile "$scratch/redis/redis.log" &
    redis_pid=$!
    for _ in $(seq 1 100); do
      if ! kill -0 "$redis_pid" 2>/dev/null; then break; fi
      if [ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ]; then break 2; fi
      sleep 0.1
    done
    kill "$redis_pid" 2>/dev/null || true
    wait "$redis_pid" 2>/dev/null || true
    redis_pid=
  done
  if [ -z "$redis_pid" ]; then
    echo "test.sh: cannot start a redis-server of this run's own; its log:" >&2
    cat "$scratch/redis/redis.log" >&2 || true
    exit 1
  fi
  export COMMISSAIRE_TEST_REDIS="redis://127.0.0.1:$port"
fi
echo "test.sh: scratch $scratch, Redis $COMMISSAIRE_TEST_REDIS" >&2

# The scratch directory is TMPDIR for the build too: cargo's target
# directory is not in it.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
export TMPDIR="$scratch/tmp"

log="$scratch/test.log"
failed=0

# With no arguments, also the plugin template, out of tree as its users
# build it, in the shared target directory and with the workspace's lock
# file, so that nothing is built twice.
if [ $# -eq 0 ]; then
  cp Cargo.lock examples/plugin-template/Cargo.lock
  CARGO_PROFILE_DEV_DEBUG="${CARGO_PROFILE_DEV_DEBUG:-line-tables-only}" \
    cargo test --no-fail-fast --manifest-path examples/plugin-template/Cargo.toml 2>&1 |
    tee -a "$log" || failed=1
fi

cargo test --no-fail-fast "$@" 2>&1 | tee -a "$log" || failed=1

if [ "$failed" -ne 0 ]; then
  echo >&2
  echo "test.sh: FAILED. Every failing test of the run:" >&2
  awk '/^ +(Running|Doc-tests) /{sub(/^ +/, ""); bin = $0}
       /^test .* \.\.\. FAILED$/{sub(/^test /, ""); sub(/ \.\.\. FAILED$/, ""); print "  " $0 "    (" bin ")"}' "$log" >&2
  # The binaries that failed (with the command to run each again), and any
  # that did not build.
  grep -E '^error: ([0-9]+ targets? failed|test failed|could not compile)|^    `' "$log" >&2 || true
  exit 1
fi
