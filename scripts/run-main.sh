#!/usr/bin/env bash
# Builds normkit's examples and benchmarks (Release), runs every example, then the
# benchmarks in quick mode, each ending with its roofline summary table.
# Installs the Debian packages it needs when they are missing (run as root, or with sudo).
#   scripts/run-main.sh            build dir: build/main (BUILD_DIR=... to change)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$NORMKIT_ROOT"

build="${BUILD_DIR:-build/main}"
jobs="$(nproc)"

# --- benchmark invocation: the only place that knows the bench targets and quick mode ---
bench_targets=(bench_layer_norm bench_rms_norm bench_channel_norm bench_adaptive_norm)
run_bench() {  # $1: a bench target's name
  NORMKIT_BENCH_QUICK=1 "$build/bench/$1"
}
# -----------------------------------------------------------------------------------------

trap 'report_failure run-main' EXIT

log "Debian packages"
ensure_debs g++ make cmake libeigen3-dev libbenchmark-dev
find_launcher

log "configure $build (Release, examples and benchmarks, no tests)"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release "${LAUNCHER_ARGS[@]}" \
  -DNORMKIT_BUILD_TESTS=OFF -DNORMKIT_BUILD_EXAMPLES=ON -DNORMKIT_BUILD_BENCH=ON

log "build (-j$jobs)"
cmake --build "$build" -j "$jobs"

# Every executable the examples folder built: a new example runs without editing this.
mapfile -t examples < <(find "$build/examples" -maxdepth 1 -type f -perm -u+x | sort)
if [ ${#examples[@]} -eq 0 ]; then
  echo "error: no example executables in $build/examples" >&2
  exit 1
fi
for exe in "${examples[@]}"; do
  log "example: $(basename "$exe")"
  "$exe"
done

for target in "${bench_targets[@]}"; do
  log "benchmark (quick): $target"
  run_bench "$target"
done

log "run-main: OK (${#examples[@]} example(s), ${#bench_targets[@]} benchmark(s)) in ${SECONDS}s"
