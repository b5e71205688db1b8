#!/usr/bin/env bash
# Supply-chain check: cargo-deny (advisories, licenses, bans, sources; policy
# in deny.toml) against an offline snapshot of the RustSec advisory database.
# Exits non-zero on any finding deny.toml does not accept.
# See docs/dependencies.md.
#
#   COMMISSAIRE_ADVISORY_DB  the snapshot to use (a copy of rustsec/advisory-db);
#                            else ../shared/advisory-db next to the repository,
#                            else /work/shared/advisory-db.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

deny_version=0.20.2
# cargo-deny 0.20 opens the database at <db-path>/<this name>, which it derives
# from its default URL (https://github.com/rustsec/advisory-db).
db_dir_name=advisory-db-3157b0e258782691

die() {
    echo "deny.sh: $*" >&2
    exit 1
}

# --- cargo-deny, pinned: installed once per machine (compiling takes ~6 min).
found=$(cargo deny --version 2>/dev/null || true)
if [[ $found != "cargo-deny $deny_version" ]]; then
    echo "deny.sh: installing cargo-deny $deny_version (found: ${found:-none})" >&2
    cargo install --locked "cargo-deny@$deny_version"
fi

# --- The advisory snapshot.
is_snapshot() { [[ -d $1/crates ]]; }
if [[ -n ${COMMISSAIRE_ADVISORY_DB:-} ]]; then
    # Named explicitly: a wrong path is an error, not a reason to look elsewhere.
    is_snapshot "$COMMISSAIRE_ADVISORY_DB" ||
        die "COMMISSAIRE_ADVISORY_DB=$COMMISSAIRE_ADVISORY_DB is not an advisory database (no crates/ directory)"
    snapshot=$COMMISSAIRE_ADVISORY_DB
elif is_snapshot "$root/../shared/advisory-db"; then
    snapshot=$root/../shared/advisory-db
elif is_snapshot /work/shared/advisory-db; then
    snapshot=/work/shared/advisory-db
else
    die "no advisory database snapshot: set COMMISSAIRE_ADVISORY_DB, or place one at $(realpath -m "$root/../shared/advisory-db") or /work/shared/advisory-db"
fi
snapshot=$(realpath "$snapshot")

# The snapshot carries no git history; its newest advisory dates it.
snapshot_date=$(grep -rhoE '^date = "[0-9]{4}-[0-9]{2}-[0-9]{2}"' "$snapshot/crates" |
    sort | tail -n 1 | grep -oE '[0-9]{4}-[0-9]{2}-[0-9]{2}') ||
    die "$snapshot holds no dated advisory: not an advisory database?"

# --- The database cargo-deny reads: a git repository made from the snapshot,
# kept outside the repository and rebuilt only when the snapshot changes.
cache=${XDG_CACHE_HOME:-$HOME/.cache}/commissaire-deny
mkdir -p "$cache"
fingerprint=$(cd "$snapshot" && find . -type f -not -path './.git/*' -print0 |
    LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
(
    # Concurrent CI runs on this machine share the cache.
    flock 9
    if [[ -d $cache/$db_dir_name/.git && $(cat "$cache/fingerprint" 2>/dev/null) == "$fingerprint" ]]; then
        exit 0
    fi
    echo "deny.sh: preparing the advisory database from $snapshot" >&2
    tmp=$(mktemp -d "$cache/build.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    cp -r "$snapshot/." "$tmp/db"
    chmod -R u+w "$tmp/db"
    rm -rf "$tmp/db/.git"
    stamp="${snapshot_date}T00:00:00Z"
    git -C "$tmp/db" init -q
    git -C "$tmp/db" add -A
    GIT_AUTHOR_DATE=$stamp GIT_COMMITTER_DATE=$stamp \
        git -C "$tmp/db" -c user.name=snapshot -c user.email=snapshot@localhost \
        -c commit.gpgsign=false -c core.hooksPath=/dev/null commit -qm "snapshot of $snapshot"
    # cargo-deny dates the database by the newer of HEAD's commit and HEAD's
    # mtime; back-date HEAD so that maximum-db-staleness measures the
    # snapshot's age, not the time this copy was made.
    touch -d "$stamp" "$tmp/db/.git/HEAD"
    rm -rf "${cache:?}/$db_dir_name" "$cache/fingerprint"
    mv "$tmp/db" "$cache/$db_dir_name"
    echo "$fingerprint" >"$cache/fingerprint"
) 9>"$cache/lock"
echo "deny.sh: advisory snapshot $snapshot (newest advisory $snapshot_date)" >&2

# --- The check. cargo-deny reads crate sources (license files) offline.
# The fuzz crate is a workspace of its own, with its own lock file: the same
# policy holds for it.
cargo fetch --locked --quiet
cargo fetch --locked --quiet --manifest-path fuzz/Cargo.toml
export COMMISSAIRE_DENY_DB_PATH=$cache
cargo deny --locked --offline check
echo "deny.sh: the fuzz crate (fuzz/Cargo.lock)" >&2
cargo deny --manifest-path fuzz/Cargo.toml --locked --offline --config deny.toml check
