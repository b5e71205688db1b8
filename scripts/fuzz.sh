#!/usr/bin/env bash
# Coverage-guided fuzzing of every decoder of outside bytes (fuzz/, one
# target per decoder; see docs/fuzzing.md).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Installs cargo-fuzz if absent, builds the targets, runs each (or those
# named) for SECONDS (default 30), starting from its seeds (fuzz/seeds/) and
# what earlier runs found (fuzz/corpus/, not committed). Exits non-zero if
# any target crashed, after printing each reproducer's path; replay one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz -s none -a TARGET PATH
# The build (fuzz/target/) is kept between runs: only the first is slow.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-30}
shift || true
[[ $seconds =~ ^[0-9]+$ ]] || { echo "fuzz.sh: SECONDS must be a number, not '$seconds'" >&2; exit 2; }

cargo_fuzz_version=0.13.2
if [[ $(cargo fuzz --version 2>/dev/null || true) != "cargo-fuzz $cargo_fuzz_version" ]]; then
    echo "fuzz.sh: installing cargo-fuzz $cargo_fuzz_version" >&2
    cargo install --locked "cargo-fuzz@$cargo_fuzz_version"
fi

# cargo-fuzz passes -Z flags (sanitizer coverage) that only a nightly
# compiler takes; RUSTC_BOOTSTRAP lets the stable one take them. No
# sanitizer: the host has no unsafe code, and uninstrumented memory runs
# several times as many inputs per second.
export RUSTC_BOOTSTRAP=1
fuzz_dir=(--fuzz-dir fuzz)
build=(-s none --debug-assertions)

started=$(date +%s)
cargo fuzz build "${fuzz_dir[@]}" "${build[@]}"
echo "fuzz.sh: targets built in $(($(date +%s) - started)) s" >&2

targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    mapfile -t targets < <(cargo fuzz list "${fuzz_dir[@]}")
fi

failed=()
for target in "${targets[@]}"; do
    corpus=fuzz/corpus/$target
    artifacts=fuzz/artifacts/$target
    mkdir -p "$corpus" "$artifacts"
    seeds=()
    [[ -d fuzz/seeds/$target ]] && seeds=("fuzz/seeds/$target")
    options=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048
        -print_final_stats=1 -artifact_prefix="$artifacts/")
    [[ -f fuzz/dict/$target.dict ]] && options+=(-dict="fuzz/dict/$target.dict")
    # A fixed seed (CI sets FUZZ_SEED=1) makes a run from the same corpus
    # take the same inputs in the same order: a slower machine explores a
    # prefix of what a faster one did, so CI does not fail on luck. Longer
    # runs by hand leave it unset and explore anew each time.
    [[ -n ${FUZZ_SEED:-} ]] && options+=(-seed="$FUZZ_SEED")
    log=$(mktemp)
    echo "fuzz.sh: $target for $seconds s" >&2
    if cargo fuzz run "${fuzz_dir[@]}" "${build[@]}" "$target" "$corpus" "${seeds[@]}" -- "${options[@]}" >"$log" 2>&1; then
        grep -E '^stat::number_of_executed_units|^stat::average_exec_per_sec' "$log" |
            sed "s/^/fuzz.sh: $target /" >&2
    else
        # The property that failed, then how libFuzzer ended.
        grep -m 1 -A 4 'panicked at' "$log" >&2 || true
        tail -n 25 "$log" >&2
        reproducer=$(grep -oE "(Test unit|artifact) written to [^ ]+" "$log" | awk '{print $NF}' | tail -n 1)
        echo "fuzz.sh: $target FAILED; reproducer: ${reproducer:-none written}" >&2
        failed+=("$target ${reproducer:-}")
    fi
    rm -f "$log"
done

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "fuzz.sh: crashes:" >&2
    printf '  %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "fuzz.sh: no crash in ${#targets[@]} targets, $seconds s each" >&2
