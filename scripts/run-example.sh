#!/usr/bin/env bash
# Builds the host and our example plugins, drops the plugins into
# target/example-plugins, and serves them on the embedded bus (memory://)
# with the HTTP endpoint on 127.0.0.1:8080. Extra arguments go to `run`,
# e.g. --bus-uri amqp://guest:guest@127.0.0.1:5672/%2f
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p commissaire-host -p commissaire-plugin-simple -p commissaire-plugin-demo
mkdir -p target/example-plugins
cp target/release/libsimple.so target/release/libdemo.so target/example-plugins/
exec target/release/commissaire-host run --config examples/host.toml "$@"
