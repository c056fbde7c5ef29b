# shellcheck shell=bash
# Sourced by scripts/run-*.sh: the repository root, logging, Debian package installs.
# Needs bash >= 4.4 (empty arrays under set -u), as Debian 12 has.

# shellcheck disable=SC2034  # used by the scripts that source this file
NORMKIT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# A step heading with the seconds since the script started.
log() { printf '\n==> [%4ds] %s\n' "$SECONDS" "$*"; }

# ctest_passed LOG: the number of tests of a ctest run that passed them all ("100% tests
# passed, 0 tests failed out of N" in LOG), or nothing.
ctest_passed() { sed -n 's/^100% tests passed, 0 tests failed out of \([0-9][0-9]*\)$/\1/p' "$1"; }

is_installed() {
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = "installed" ]
}

# ensure_debs REQUIRED... [-- OPTIONAL...]: installs whichever of these Debian packages
# are missing, running apt-get update first only if one is. A required package that
# fails to install stops the script; an optional one is reported and skipped.
ensure_debs() {
  local required=() optional=() missing=() missing_opt=() p list=required
  for p in "$@"; do
    if [ "$p" = "--" ]; then list=optional; continue; fi
    if [ "$list" = required ]; then required+=("$p"); else optional+=("$p"); fi
  done
  for p in "${required[@]}"; do is_installed "$p" || missing+=("$p"); done
  for p in "${optional[@]}"; do is_installed "$p" || missing_opt+=("$p"); done
  if [ ${#missing[@]} -eq 0 ] && [ ${#missing_opt[@]} -eq 0 ]; then
    echo "Debian packages already installed: ${required[*]} ${optional[*]}"
    return 0
  fi

  local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Use-Pty=0)
  if [ "$(id -u)" -ne 0 ]; then apt=(sudo "${apt[@]}"); fi
  echo "Installing missing Debian packages: ${missing[*]} ${missing_opt[*]}"
  "${apt[@]}" update
  if [ ${#missing[@]} -gt 0 ]; then
    "${apt[@]}" install --no-install-recommends "${missing[@]}"
  fi
  for p in "${missing_opt[@]}"; do
    "${apt[@]}" install --no-install-recommends "$p" || echo "note: optional package $p not installed"
  done
}

# Sets LAUNCHER_ARGS: the cmake argument that puts ccache in front of the compiler if
# ccache is installed, else nothing.
find_launcher() {
  LAUNCHER_ARGS=()
  if command -v ccache >/dev/null 2>&1; then
    LAUNCHER_ARGS=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  fi
}

# For an EXIT trap: if the script failed, a last line naming it, the step and the time.
# report_failure NAME [STEP]
report_failure() {
  local status=$?
  if [ "$status" -ne 0 ]; then
    echo "$1: FAILED${2:+ in $2} (exit $status) after ${SECONDS}s"
  fi
}
