#!/usr/bin/env bash
# normkit's test suite for aarch64, as CI runs it: the tests cross-compiled with
# Debian's g++-aarch64-linux-gnu (Release, -O2, -Werror; NORMKIT_MAX_ISA=1, i.e. the NEON
# backend, checked by tests/simd.cpp) and run under qemu-user (qemu-aarch64), each big
# test file as its own ctest entry, side by side. The project is tests/aarch64, the
# toolchain cmake/toolchains/aarch64-linux-gnu.cmake.
# Installs the Debian packages it needs when they are missing (run as root, or with sudo).
# Build dir: build/aarch64. Ends with "run-tests-aarch64: N passed, 0 failed" (N: ctest
# entries).
# NORMKIT_AARCH64_VARIANTS="neon;scalar" also builds and runs the forced-scalar variant
# (about twice the compile time; CI runs neon only).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$NORMKIT_ROOT"

jobs="$(nproc)"
variants="${NORMKIT_AARCH64_VARIANTS:-neon}"
build=build/aarch64
step="setup"
trap 'report_failure run-tests-aarch64 "$step"' EXIT

log "Debian packages"
# g++-aarch64-linux-gnu brings the target's libc and libstdc++ (under /usr/aarch64-linux-gnu,
# where qemu-aarch64 -L finds them); Eigen and Catch2 are header-only: the host's serve.
ensure_debs g++-aarch64-linux-gnu qemu-user libeigen3-dev catch2 cmake make -- ccache
find_launcher

step="aarch64 Release"
log "$step: configure $build (variants: $variants)"
cmake -S tests/aarch64 -B "$build" \
  -DCMAKE_TOOLCHAIN_FILE="$NORMKIT_ROOT/cmake/toolchains/aarch64-linux-gnu.cmake" \
  -DCMAKE_BUILD_TYPE=Release "${LAUNCHER_ARGS[@]}" -DNORMKIT_WERROR=ON \
  -DNORMKIT_AARCH64_VARIANTS="$variants"
log "$step: build (-j$jobs)"
cmake --build "$build" -j "$jobs"

# A binary that is not aarch64 would run natively, and test nothing of the target.
for exe in "$build"/normkit_tests_*; do
  if ! LC_ALL=C readelf -h "$exe" | grep -q 'Machine:.*AArch64'; then
    echo "error: $exe is not an aarch64 executable" >&2
    exit 1
  fi
done

log "$step: ctest (qemu-aarch64)"
log_file="$build/ctest.log"
(cd "$build" && ctest --output-on-failure --no-tests=error -j "$jobs") 2>&1 | tee "$log_file"
passed="$(ctest_passed "$log_file")"

step="summary"
log "run-tests-aarch64: passed in ${SECONDS}s"
echo "run-tests-aarch64: ${passed:-0} passed, 0 failed"
