#!/usr/bin/env bash
# The test command: brokers up, Python test client ready, then every test of
# the workspace (unit tests, plugin tests, end-to-end tests against the real
# RabbitMQ and the real binary).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-brokers.sh

# kombu from PyPI, for the tests that play a Python Commissaire caller.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import kombu.transport.redis, redis' 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install -q 'kombu[redis]>=5.3,<6'
fi
export COMMISSAIRE_TEST_PYTHON="$PWD/.venv/bin/python"

# The plugin template, out of tree as its users build it, in the shared
# target directory and with the workspace's lock file, so that nothing is
# built twice.
cp Cargo.lock examples/plugin-template/Cargo.lock
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}" \
  cargo test --manifest-path examples/plugin-template/Cargo.toml

exec cargo test --workspace "$@"
