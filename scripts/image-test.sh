#!/usr/bin/env bash
# Builds the container image (dist/container/Containerfile) on a machine
# that reaches Debian's packages and crates.io but no image registry, then
# runs it on the host network: simple.add over RabbitMQ and /healthz over
# HTTP must answer. Slow (the host is compiled in release mode inside the
# build stage): not part of .ci/run; see docs/deploy.md.
#
#   scripts/image-test.sh      -> image localhost/commissaire-host:test
#
# The base image is made once with mmdebstrap (Debian bookworm) and kept
# as localhost/debian-base:bookworm; the builder is that base with gcc,
# given this machine's Rust toolchain and cargo registry by bind mounts.
# Elsewhere, build with the Containerfile's defaults (rust and debian
# images from a registry).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
for tool in mmdebstrap buildah podman; do
    command -v "$tool" >/dev/null || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$tool"
done
scripts/ensure-brokers.sh

base=localhost/debian-base:bookworm
builder=localhost/commissaire-builder:bookworm
image=localhost/commissaire-host:test
started=$(date +%s)
if ! buildah inspect --type image "$base" >/dev/null 2>&1; then
    tar=$(mktemp --suffix=.tar)
    mmdebstrap --variant=apt --format=tar bookworm "$tar"
    podman import "$tar" "$base"
    rm -f "$tar"
fi
if ! buildah inspect --type image "$builder" >/dev/null 2>&1; then
    ctr=$(buildah from "$base")
    buildah run --isolation chroot "$ctr" -- sh -c \
        'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev ca-certificates binutils >/dev/null'
    buildah config --env PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
    buildah commit -q "$ctr" "$builder" >/dev/null
    buildah rm "$ctr" >/dev/null
fi
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
cargo_home=${CARGO_HOME:-$HOME/.cargo}
# The repository's own target directory: what was built before is reused.
mkdir -p target
buildah bud --isolation chroot --format docker --layers=false \
    --build-arg BUILDER="$builder" --build-arg BASE="$base" \
    -v "$rustup_home:/root/.rustup:ro" -v "$cargo_home/bin:/root/.cargo/bin:ro" \
    -v "$cargo_home/registry:/root/.cargo/registry" \
    -v "$PWD/target:/src/target" \
    -f dist/container/Containerfile -t "$image" .
echo "image-test.sh: built $image in $(($(date +%s) - started)) s" >&2
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$image" >&2

# Run it as the runtime would: its entrypoint, user and config, on the
# host's network, with the bus URI from the environment.
# A vhost of its own: the image serves its services under their own queue
# names (simple, demo), which must not meet anyone else's.
vhost="image-test-$$-$RANDOM"
rabbitmqctl -q add_vhost "$vhost"
rabbitmqctl -q set_permissions -p "$vhost" guest '.*' '.*' '.*'
uri="amqp://guest:guest@127.0.0.1:5672/$vhost"
exchange=commissaire
port=$((20000 + RANDOM % 20000))
ctr=$(buildah from "$image")
mnt_log=$(mktemp)
cleanup() {
    [[ -n ${pid:-} ]] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    buildah rm "$ctr" >/dev/null 2>&1 || true
    rabbitmqctl -q delete_vhost "$vhost" >/dev/null 2>&1 || true
    rm -f "$mnt_log"
}
trap cleanup EXIT
buildah run --isolation chroot --network host --user commissaire \
    --env COMMISSAIRE_BUS_URI="$uri" "$ctr" -- \
    /usr/bin/commissaire-host run --config /etc/commissaire/host.toml \
    --http-listen "127.0.0.1:$port" 2>"$mnt_log" &
pid=$!
healthy=""
for _ in $(seq 1 120); do
    if curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; then healthy=yes; break; fi
    sleep 0.5
done
[[ -n $healthy ]] || { cat "$mnt_log" >&2; echo "image-test.sh: /healthz never answered 200" >&2; exit 1; }
answer=$(cargo run -q -p commissaire-host -- call simple.add '[1, 2]' \
    --bus-uri "$uri" --bus-exchange "$exchange")
[[ $answer == 3 ]] || { cat "$mnt_log" >&2; echo "image-test.sh: simple.add answered '$answer'" >&2; exit 1; }
echo "image-test.sh: the image answered simple.add [1, 2] = $answer over RabbitMQ and /healthz 200 over HTTP" >&2
# SIGTERM to the host itself, as `podman stop` or Kubernetes send it to a
# container's first process (buildah run would SIGKILL its child instead
# of passing the signal on).
inside=$(pgrep -f "^/usr/bin/commissaire-host run --config /etc/commissaire/host.toml --http-listen 127.0.0.1:$port\$")
kill -TERM "$inside"
if wait "$pid"; then echo "image-test.sh: stopped cleanly on SIGTERM" >&2; else
    status=$?
    cat "$mnt_log" >&2
    echo "image-test.sh: exit status $status on SIGTERM" >&2
    exit 1
fi
pid=""
