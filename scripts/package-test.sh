#!/usr/bin/env bash
# Builds the Debian package (cargo-deb) and checks it: its contents, that
# its maintainer scripts start nothing, and that the unpacked tree serves
# simple.add with the packaged config on the real Redis (database 13, this
# script's own). Prints the package's contents and size.
#
#   scripts/package-test.sh      -> target/debian/commissaire-host_<version>_<arch>.deb
set -euo pipefail
cd "$(dirname "$0")/.."

cargo_deb_version=3.8.0
if [[ $(cargo deb --version 2>/dev/null || true) != "cargo-deb $cargo_deb_version"* ]]; then
    echo "package-test.sh: installing cargo-deb $cargo_deb_version" >&2
    cargo install --locked "cargo-deb@$cargo_deb_version"
fi
scripts/ensure-brokers.sh

started=$(date +%s)
cargo build --release -p commissaire-host -p commissaire-plugin-simple -p commissaire-plugin-demo
deb=$(cargo deb -p commissaire-host --no-build --strip 2>/dev/null | tail -n 1)
echo "package-test.sh: built $deb in $(($(date +%s) - started)) s ($(du -h "$deb" | cut -f1))" >&2

fail() { echo "package-test.sh: $*" >&2; exit 1; }

contents=$(dpkg-deb -c "$deb")
echo "$contents"
for path in ./usr/bin/commissaire-host \
    ./lib/systemd/system/commissaire-host.service \
    ./lib/systemd/system/commissaire-host@.service \
    ./etc/commissaire/host.toml ./etc/default/commissaire-host \
    ./usr/lib/commissaire/examples/libsimple.so ./usr/lib/commissaire/examples/libdemo.so \
    ./usr/lib/commissaire/plugins/README ./usr/share/doc/commissaire-host/deploy.md; do
    grep -q " $path\$" <<<"$contents" || fail "$path is not in the package"
done
grep -q -- "^-rw------- [^ ]* .* ./etc/default/commissaire-host$" <<<"$contents" ||
    fail "/etc/default/commissaire-host (the bus password) is not 0600"
scripts_dir=$(mktemp -d)
scratch=""
cleanup() {
    rm -rf "$scripts_dir"
    if [[ -n $scratch ]]; then rm -rf "$scratch"; fi
}
trap cleanup EXIT
dpkg-deb -e "$deb" "$scripts_dir"
grep -q "etc/commissaire/host.toml" "$scripts_dir/conffiles" || fail "host.toml is not a conffile"
if cat "$scripts_dir"/post* "$scripts_dir"/pre* 2>/dev/null | grep -v '^[[:space:]]*#' |
    grep -E -q "systemctl (start|enable|restart)|deb-systemd-invoke"; then
    fail "a maintainer script starts or enables something"
fi

# The unpacked tree serves, with the packaged config. Under target/, not
# /tmp: plugins must lie in directories no one else may write.
scratch=$(mktemp -d "$PWD/target/package-test.XXXXXX")
dpkg-deb -x "$deb" "$scratch"
bin="$scratch/usr/bin/commissaire-host"
# readelf (binutils, which gcc brings) rather than file(1), which a fresh
# machine may lack.
! readelf -S "$bin" | grep -q '\.debug_info' || fail "the packaged binary is not stripped"
echo "package-test.sh: binary $(du -h "$bin" | cut -f1)" >&2
exchange="package-test-$$-$RANDOM"
export COMMISSAIRE_BUS_URI=redis://127.0.0.1:6379/13
"$bin" run --config "$scratch/etc/commissaire/host.toml" \
    --plugins-dir "$scratch/usr/lib/commissaire/examples" --bus-exchange "$exchange" \
    2>"$scratch/host.log" &
host=$!
answer=""
for _ in $(seq 1 120); do
    if answer=$("$bin" call simple.add '[1, 2]' --config "$scratch/etc/commissaire/host.toml" \
        --bus-exchange "$exchange" 2>/dev/null); then
        break
    fi
    kill -0 "$host" 2>/dev/null || { cat "$scratch/host.log" >&2; fail "the packaged host exited"; }
    sleep 0.5
done
kill -TERM "$host"
wait "$host" || true
# Database 13 is this script's own: nothing of it stays.
redis-cli -n 13 --scan | while read -r key; do redis-cli -n 13 del "$key" >/dev/null; done
[[ $answer == 3 ]] || { cat "$scratch/host.log" >&2; fail "simple.add answered '$answer', not 3"; }
echo "package-test.sh: the packaged host answered simple.add [1, 2] = $answer" >&2
