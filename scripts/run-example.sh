#!/usr/bin/env bash
# Builds the host and our example plugins, drops the plugins into
# target/example-plugins, and serves them on the embedded bus (memory://)
# with the HTTP endpoint on 127.0.0.1:8080. Extra arguments go to `run`,
# e.g. --bus-uri amqp://guest:guest@127.0.0.1:5672/%2f
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p commissaire-host -p commissaire-plugin-simple -p commissaire-plugin-demo
# examples/host.toml serves ../target/example-plugins: the plugins go there
# wherever cargo builds (CARGO_TARGET_DIR).
built="${CARGO_TARGET_DIR:-target}/release"
mkdir -p target/example-plugins
# Copy beside, then rename over: a SIGHUP to a running host in the middle
# of a copy would check and load half a file (see the SIGHUP row of
# docs/reliability.md, and "Which plugin files the host trusts" in
# docs/plugins.md).
for lib in libsimple.so libdemo.so; do
  cp "$built/$lib" "target/example-plugins/.$lib.new"
  mv "target/example-plugins/.$lib.new" "target/example-plugins/$lib"
done
exec "$built/commissaire-host" run --config examples/host.toml "$@"
