#!/usr/bin/env bash
# normkit's test suite, as CI runs it (.ci/run):
#   1. gcc Release, -Werror, tests and examples (benches off): build, ctest
#      (unit tests per SIMD backend, the examples, the MPI example on 2 and 3 ranks,
#      the install/consumer package tests);
#   2. ASan + UBSan (NORMKIT_SANITIZE), Debug at -O1, -Werror, tests only (the widest
#      test variant this CPU runs): build, ctest;
#   3. aarch64: the tests cross-compiled and run under qemu (scripts/run-tests-aarch64.sh).
# Installs the Debian packages it needs when they are missing (run as root, or with sudo).
# Build dirs: build/gcc-release, build/asan-ubsan. Ends with "run-tests: N passed, 0 failed".
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$NORMKIT_ROOT"

jobs="$(nproc)"
passed=0
step="setup"
trap 'report_failure run-tests "$step"' EXIT

# ctest_in DIR: runs DIR's tests; adds their count to $passed. Fails if any fails, or if
# there are none (a suite that ran nothing has tested nothing).
ctest_in() {
  local log="$1/ctest.log"
  (cd "$1" && ctest --output-on-failure --no-tests=error -j "$jobs") 2>&1 | tee "$log"
  local n
  n="$(sed -n 's/^100% tests passed, 0 tests failed out of \([0-9][0-9]*\)$/\1/p' "$log")"
  passed=$((passed + ${n:-0}))
}

log "Debian packages"
# libopenmpi-dev, openmpi-bin: the gcc Release step's MPI example (examples/mpi).
ensure_debs g++ make cmake libeigen3-dev catch2 libopenmpi-dev openmpi-bin -- ccache
find_launcher

step="gcc Release"
log "$step: configure build/gcc-release"
cmake -S . -B build/gcc-release -DCMAKE_CXX_COMPILER=g++ -DCMAKE_BUILD_TYPE=Release \
  "${LAUNCHER_ARGS[@]}" -DNORMKIT_WERROR=ON \
  -DNORMKIT_BUILD_TESTS=ON -DNORMKIT_BUILD_EXAMPLES=ON -DNORMKIT_BUILD_BENCH=OFF
# examples/mpi builds only where MPI is found: here it must be, or its tests vanish silently.
if ! (cd build/gcc-release && ctest -N -R '^example\.mpi\.' | grep 'Total Tests: [1-9]' >/dev/null); then
  echo "error: MPI not found: the MPI example (examples/mpi) would not be tested" >&2
  exit 1
fi
log "$step: build (-j$jobs)"
cmake --build build/gcc-release -j "$jobs"
log "$step: ctest"
ctest_in build/gcc-release

step="ASan+UBSan"
# -O1: ASan's own advice for usable speed with exact stacks; -fno-omit-frame-pointer and
# -fno-sanitize-recover=all come with NORMKIT_SANITIZE (tests/CMakeLists.txt). The
# options below make any report fail its test, whatever the flags.
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_string_checks=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
log "$step: configure build/asan-ubsan"
cmake -S . -B build/asan-ubsan -DCMAKE_CXX_COMPILER=g++ -DCMAKE_BUILD_TYPE=Debug \
  -DCMAKE_CXX_FLAGS_DEBUG="-g -O1" "${LAUNCHER_ARGS[@]}" -DCMAKE_EXPORT_COMPILE_COMMANDS=ON \
  -DNORMKIT_SANITIZE=ON -DNORMKIT_WERROR=ON \
  -DNORMKIT_BUILD_TESTS=ON -DNORMKIT_BUILD_EXAMPLES=OFF -DNORMKIT_BUILD_BENCH=OFF
log "$step: build (-j$jobs)"
cmake --build build/asan-ubsan -j "$jobs"
# A sanitizer build that instruments nothing would pass silently: check the flag is there.
if ! grep -qs -- '-fsanitize=address' build/asan-ubsan/compile_commands.json; then
  echo "error: NORMKIT_SANITIZE=ON compiled no test with -fsanitize=address" >&2
  exit 1
fi
log "$step: ctest"
ctest_in build/asan-ubsan

step="aarch64 (qemu)"
# The NEON backend: the suite cross-compiled for aarch64 and run under qemu-user
# (scripts/run-tests-aarch64.sh installs its own packages).
log "$step: scripts/run-tests-aarch64.sh"
aarch64_log="build/aarch64-run.log"
mkdir -p build
bash scripts/run-tests-aarch64.sh 2>&1 | tee "$aarch64_log"
n="$(sed -n 's/^run-tests-aarch64: \([0-9][0-9]*\) passed, 0 failed$/\1/p' "$aarch64_log")"
if [ -z "$n" ]; then
  echo "error: the aarch64 suite did not report its passed tests" >&2
  exit 1
fi
passed=$((passed + n))

step="summary"
log "run-tests: all configurations passed in ${SECONDS}s"
echo "run-tests: ${passed} passed, 0 failed"
