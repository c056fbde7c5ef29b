#!/usr/bin/env bash
# normkit's test suite, as CI runs it (.ci/run): three configurations, run side by side
# (each alone leaves a core idle at times: its last long compile, its serial package
# tests, its qemu runs; together they keep both busy):
#   1. gcc Release, -Werror, tests and examples (benches off): build, ctest
#      (unit tests at every dispatch level, the examples, the MPI example on 2 and 3
#      ranks, the install/consumer package tests);
#   2. ASan + UBSan (NORMKIT_SANITIZE) on the library's code (the engines and kernel
#      twins; tests/CMakeLists.txt), Debug at -O1, -Werror, the widest test variant this
#      CPU runs: build, ctest;
#   3. aarch64: the tests cross-compiled and run under qemu (scripts/run-tests-aarch64.sh).
# Installs the Debian packages it needs when they are missing (run as root, or with sudo).
# Build dirs: build/gcc-release, build/asan-ubsan, build/aarch64; each configuration's
# output goes to build/<name>.log, printed when it ends. Ends with
# "run-tests: N passed, 0 failed" (N: ctest entries).
# NORMKIT_STAGES="release asan aarch64" (the default) picks configurations to run.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$NORMKIT_ROOT"

jobs="$(nproc)"
stages="${NORMKIT_STAGES:-release asan aarch64}"
step="setup"
trap 'report_failure run-tests "$step"' EXIT

log "Debian packages"
# All of them here, before the configurations start side by side (apt allows one at a
# time). libopenmpi-dev, openmpi-bin: the Release step's MPI example (examples/mpi);
# g++-aarch64-linux-gnu, qemu-user: the aarch64 step.
ensure_debs g++ make cmake libeigen3-dev catch2 libopenmpi-dev openmpi-bin \
  g++-aarch64-linux-gnu qemu-user -- ccache
find_launcher
mkdir -p build

# ctest_in DIR: runs DIR's tests; writes their count to DIR/ctest.passed. Fails if any
# fails, or if there are none (a suite that ran nothing has tested nothing).
ctest_in() {
  local log="$1/ctest.log"
  (cd "$1" && ctest --output-on-failure --no-tests=error -j "$jobs") 2>&1 | tee "$log"
  ctest_passed "$log" >"$1/ctest.passed"
}

stage_release() {
  log "gcc Release: configure build/gcc-release"
  cmake -S . -B build/gcc-release -DCMAKE_CXX_COMPILER=g++ -DCMAKE_BUILD_TYPE=Release \
    "${LAUNCHER_ARGS[@]}" -DNORMKIT_WERROR=ON \
    -DNORMKIT_BUILD_TESTS=ON -DNORMKIT_BUILD_EXAMPLES=ON -DNORMKIT_BUILD_BENCH=OFF
  # examples/mpi builds only where MPI is found: here it must be, or its tests vanish silently.
  if ! (cd build/gcc-release && ctest -N -R '^example\.mpi\.' | grep 'Total Tests: [1-9]' >/dev/null); then
    echo "error: MPI not found: the MPI example (examples/mpi) would not be tested" >&2
    return 1
  fi
  log "gcc Release: build (-j$jobs)"
  cmake --build build/gcc-release -j "$jobs"
  log "gcc Release: ctest"
  ctest_in build/gcc-release
  cp build/gcc-release/ctest.passed build/release.passed
}

stage_asan() {
  # -O1: ASan's own advice for usable speed with exact stacks. -g1: line tables only (a
  # report's stack keeps its files and lines); full -g took 1.5 times as long to compile
  # (engines_narrow_bf16.cpp, AVX2: 126 s against 83 s, Zen 3, 2026-12-07, where this
  # stage's build took 30 of CI's 38 minutes). -fno-omit-frame-pointer and
  # -fno-sanitize-recover=all come with NORMKIT_SANITIZE (tests/CMakeLists.txt). The
  # options below make any report fail its test, whatever the flags.
  export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_string_checks=1"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
  log "ASan+UBSan: configure build/asan-ubsan"
  cmake -S . -B build/asan-ubsan -DCMAKE_CXX_COMPILER=g++ -DCMAKE_BUILD_TYPE=Debug \
    -DCMAKE_CXX_FLAGS_DEBUG="-g1 -O1" "${LAUNCHER_ARGS[@]}" -DCMAKE_EXPORT_COMPILE_COMMANDS=ON \
    -DNORMKIT_SANITIZE=ON -DNORMKIT_WERROR=ON \
    -DNORMKIT_BUILD_TESTS=ON -DNORMKIT_BUILD_EXAMPLES=OFF -DNORMKIT_BUILD_BENCH=OFF
  log "ASan+UBSan: build (-j$jobs)"
  cmake --build build/asan-ubsan -j "$jobs"
  # A sanitizer build that instruments nothing would pass silently: check the flag is
  # there, on the engines.
  if ! grep -qs -- '-fsanitize=address.*engines_row\.cpp' build/asan-ubsan/compile_commands.json; then
    echo "error: NORMKIT_SANITIZE=ON compiled the engines without -fsanitize=address" >&2
    return 1
  fi
  log "ASan+UBSan: ctest"
  ctest_in build/asan-ubsan
  cp build/asan-ubsan/ctest.passed build/asan.passed
}

stage_aarch64() {
  # The NEON backend: the suite cross-compiled for aarch64 and run under qemu-user.
  log "aarch64 (qemu): scripts/run-tests-aarch64.sh"
  bash scripts/run-tests-aarch64.sh | tee build/aarch64-run.log
  sed -n 's/^run-tests-aarch64: \([0-9][0-9]*\) passed, 0 failed$/\1/p' build/aarch64-run.log \
    >build/aarch64.passed
}

step="configurations"
declare -A pid_of=()
for s in $stages; do
  rm -f "build/$s.passed"
  log "$s: started (output in build/$s.log)"
  ( set -euo pipefail; "stage_$s" ) >"build/$s.log" 2>&1 &
  pid_of[$s]=$!
done

failed=()
passed=0
for s in $stages; do
  status=0
  wait "${pid_of[$s]}" || status=$?
  log "$s: ended (exit $status); its output, build/$s.log:"
  cat "build/$s.log"
  n="$(cat "build/$s.passed" 2>/dev/null || true)"
  if [ "$status" -ne 0 ] || [ -z "$n" ]; then
    echo "run-tests: configuration $s FAILED (exit $status${n:+, }${n:+$n passed})" >&2
    failed+=("$s")
  else
    echo "run-tests: configuration $s: $n passed"
    passed=$((passed + n))
  fi
done

step="summary"
if [ ${#failed[@]} -gt 0 ]; then
  echo "run-tests: failed configurations: ${failed[*]}" >&2
  exit 1
fi
log "run-tests: all configurations passed in ${SECONDS}s"
echo "run-tests: ${passed} passed, 0 failed"
