#!/usr/bin/env bash
# The test command: brokers up, Python test client ready, then the tests.
# With no arguments, every test of the workspace (unit tests, plugin tests,
# end-to-end tests against the real RabbitMQ, Redis and the real binary).
# Arguments go to `cargo test` and narrow the run, e.g.
#   scripts/test.sh -p commissaire-e2e --test cli
#   scripts/test.sh -p commissaire-host
# (`cargo test` without `-p` tests every member of this workspace.)
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

# With no arguments, also the plugin template, out of tree as its users
# build it, in the shared target directory and with the workspace's lock
# file, so that nothing is built twice.
if [ $# -eq 0 ]; then
  cp Cargo.lock examples/plugin-template/Cargo.lock
  CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}" \
    CARGO_PROFILE_DEV_DEBUG="${CARGO_PROFILE_DEV_DEBUG:-line-tables-only}" \
    cargo test --manifest-path examples/plugin-template/Cargo.toml
fi

exec cargo test "$@"
