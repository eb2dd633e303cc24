# Shared by scripts/bootstrap and scripts/test (sourced, not run).

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi; }

# Debian packages, where this runs as root or with passwordless sudo.
apt_install() {
  command -v apt-get >/dev/null || return 1
  as_root apt-get update -qq >/dev/null && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# PY: Python >= 3.11: $PYTHON if set, else the first of python3, python3.13, python3.12,
# python3.11 that is new enough (an AMI's python3 may be older than its python3.12).
new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
find_python() {
  PY=${PYTHON:-}
  if [ -z "$PY" ]; then
    for candidate in python3 python3.13 python3.12 python3.11; do
      if command -v "$candidate" >/dev/null && new_enough "$candidate"; then PY=$candidate; break; fi
    done
  fi
  if [ -z "$PY" ] || ! new_enough "$PY"; then
    echo "vggprice needs Python >= 3.11: ${PY:-none of python3, python3.13, python3.12, python3.11} is not (set PYTHON=/path/to/python3.11)" >&2
    exit 1
  fi
}
