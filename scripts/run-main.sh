#!/usr/bin/env bash
# Builds normkit's examples and benchmarks (Release), runs every example, then the
# benchmarks in quick mode, each ending with its roofline summary table (bench_layer_norm
# and bench_channel_norm also time oneDNN's LayerNorm and BatchNorm beside normkit's, after
# checking that their outputs agree), then turns the benchmarks' JSON into a Markdown
# report and a chart (scripts/bench_report.py, gnuplot):
#   $build/bench-json/<bench>.json, $build/bench-report/bench_report.md, bench_ratio.svg
# Installs the Debian packages it needs when they are missing (run as root, or with sudo).
#   scripts/run-main.sh            build dir: build/main (BUILD_DIR=... to change)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$NORMKIT_ROOT"

build="${BUILD_DIR:-build/main}"
jobs="$(nproc)"

# --- benchmark invocation: the only place that knows the bench targets and quick mode ---
bench_targets=(bench_layer_norm bench_rms_norm bench_channel_norm bench_adaptive_norm)
json_dir="$build/bench-json"
report_dir="$build/bench-report"
# OMP_WAIT_POLICY=passive: oneDNN's OpenMP threads sleep at barriers instead of spinning,
# which on this shared 2-core machine keeps its 2-thread runs from collapsing (see
# bench/onednn.hpp); no effect on single-thread runs or on normkit.
run_bench() {  # $1: a bench target's name; also writes $json_dir/$1.json
  OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}" NORMKIT_BENCH_QUICK=1 "$build/bench/$1" \
    --benchmark_out="$json_dir/$1.json" --benchmark_out_format=json
}
# -----------------------------------------------------------------------------------------

trap 'report_failure run-main' EXIT

log "Debian packages"
# libdnnl-dev: oneDNN, timed beside normkit; gnuplot-nox and python3: the report's chart.
ensure_debs g++ make cmake libeigen3-dev libbenchmark-dev libdnnl-dev gnuplot-nox python3
find_launcher

log "configure $build (Release, examples and benchmarks with oneDNN, no tests)"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release "${LAUNCHER_ARGS[@]}" \
  -DNORMKIT_BUILD_TESTS=OFF -DNORMKIT_BUILD_EXAMPLES=ON -DNORMKIT_BUILD_BENCH=ON \
  -DNORMKIT_BENCH_ONEDNN=ON

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

mkdir -p "$json_dir"
json_files=()
for target in "${bench_targets[@]}"; do
  log "benchmark (quick): $target"
  rm -f "$json_dir/$target.json"
  run_bench "$target"
  json_files+=("$json_dir/$target.json")
done

log "benchmark report: $report_dir/bench_report.md, $report_dir/bench_ratio.svg"
python3 scripts/bench_report.py "${json_files[@]}" \
  --markdown "$report_dir/bench_report.md" --svg "$report_dir/bench_ratio.svg"
echo "(to refresh the README's copies: python3 scripts/bench_report.py ${json_files[*]}" \
  "--markdown docs/bench_report.md --svg docs/bench_ratio.svg)"

log "run-main: OK (${#examples[@]} example(s), ${#bench_targets[@]} benchmark(s)) in ${SECONDS}s"
