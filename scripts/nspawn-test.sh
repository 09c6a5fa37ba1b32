#!/usr/bin/env bash
# Opt-in full test of the .deb under a real systemd (not part of CI: ~3 min the first time to
# build the root file system, then ~1 min). Needs root, systemd-nspawn and debootstrap (apt
# installs them when missing).
#
# Boots a Debian 12 container with systemd-nspawn, installs the package, starts
# dbgpt-controller (Type=notify, hardened unit, User=dbgpt), checks that systemd saw it ready,
# that `dbgpt ctl status` inside finds it under /run/dbgpt/controller/ and that its registry
# lives in /var/lib/dbgpt, that the watchdog restarts it when frozen, then stops it, removes
# and purges the package.
#
# The bookworm root file system is built once with debootstrap and cached in
# $DBGPT_CACHE_DIR/nspawn/bookworm.tar; every run unpacks a fresh copy.
#
# Usage: scripts/nspawn-test.sh [PATH.deb]   (default: the one scripts/build-dist.sh made)
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${DBGPT_CACHE_DIR:-$HOME/.cache/dbgpt-cluster}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$cache/target}

step() { echo "== nspawn-test: $*"; }
fail() { echo "nspawn-test: FAILED: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "must run as root"
deb=${1:-}
if [ -z "$deb" ]; then
    debs=("$CARGO_TARGET_DIR"/dist/dbgpt_*.deb)
    [ -f "${debs[0]}" ] || fail "no .deb: run scripts/build-dist.sh first, or pass one"
    deb=${debs[0]}
fi
[ -f "$deb" ] || fail "$deb not found"

need=()
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >/dev/null
fi

# The package's run-time dependencies (libc6, libgomp1, ..., adduser), so dpkg -i works
# offline inside the container.
deps=$(dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed 's/[ (].*//; s/^ *//' | grep -v '^$' | paste -sd, -)
img=$cache/nspawn/bookworm.tar
stamp=$cache/nspawn/bookworm.packages
if [ ! -f "$img" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$deps" ]; then
    step "debootstrap bookworm (once; cached in $img)"
    mkdir -p "$cache/nspawn"
    build=$(mktemp -d /var/tmp/dbgpt-rootfs.XXXXXX)
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    debootstrap --variant=minbase --include="systemd,systemd-sysv,dbus,$deps" \
        bookworm "$build" "${mirror:-http://deb.debian.org/debian}" >"$cache/nspawn/debootstrap.log" 2>&1 ||
        { tail -20 "$cache/nspawn/debootstrap.log"; rm -rf "$build"; fail "debootstrap"; }
    chmod 0755 "$build"
    tar -C "$build" -cf "$img.tmp" .
    mv "$img.tmp" "$img"
    echo "$deps" >"$stamp"
    rm -rf "$build"
fi

root=$(mktemp -d /var/tmp/dbgpt-nspawn.XXXXXX)
nsp=
cleanup() {
    local rc=$?
    if [ -n "$nsp" ] && kill -0 "$nsp" 2>/dev/null; then
        kill "$nsp" 2>/dev/null || true
        wait "$nsp" 2>/dev/null || true
    fi
    rm -rf "$root" "$root.console.log"
    exit $rc
}
trap cleanup EXIT
tar -C "$root" -xf "$img"
# The container's "/" (also "." in the tar) must be 0755, not mktemp's 0700, or every
# unprivileged process inside (dbus, user dbgpt) is locked out of the whole file system.
chmod 0755 "$root"
cp "$deb" "$root/root/dbgpt.deb"

step "boot the container"
# --register=no --keep-unit: there is no systemd-machined on the host (PID 1 is not systemd).
systemd-nspawn -D "$root" --register=no --keep-unit --console=passive -b >"$root.console.log" 2>&1 &
nsp=$!
leader=
for _ in $(seq 1 60); do
    leader=$(pgrep -P "$nsp" | head -1 || true)
    [ -z "$leader" ] || break
    sleep 1
done
[ -n "$leader" ] || { cat "$root.console.log"; fail "container did not start"; }
ct() { nsenter -t "$leader" -a "$@"; }
# Wait until the container's systemd has finished booting (running, or degraded if some
# unrelated unit failed); the D-Bus socket may take a moment to appear first.
state=
for _ in $(seq 1 90); do
    state=$(timeout 5 nsenter -t "$leader" -a systemctl is-system-running 2>/dev/null || true)
    case "$state" in running | degraded) break ;; esac
    sleep 1
done
echo "container systemd: $state"
case "$state" in running | degraded) ;; *) cat "$root.console.log"; fail "container did not boot" ;; esac

step "dpkg -i"
ct dpkg -i /root/dbgpt.deb
ct id dbgpt
[ "$(ct systemctl is-enabled dbgpt-controller.service || true)" = disabled ] ||
    fail "dbgpt-controller is enabled after install"

step "systemctl start dbgpt-controller (Type=notify: returns once READY=1 arrived)"
ct systemctl start dbgpt-controller.service || {
    ct journalctl -u dbgpt-controller --no-pager | tail -30
    fail "start"
}
ct systemctl is-active dbgpt-controller.service
ct systemctl show -p MainPID -p StatusText -p WatchdogUSec -p User dbgpt-controller.service
ct systemctl show -p StatusText --value dbgpt-controller.service | grep -q . ||
    fail "no STATUS= text"
out=$(ct dbgpt ctl status)
echo "$out"
echo "$out" | grep -Eq '^controller +8000 ' || fail "dbgpt ctl status does not list the controller"
ct test -S /run/dbgpt/controller/controller-8000.sock || fail "no socket in /run/dbgpt/controller"
ct dbgpt model list --address http://127.0.0.1:8000
owner=$(ct stat -c %U /var/lib/dbgpt/registry.redb)
[ "$owner" = dbgpt ] || fail "registry owned by $owner"

step "watchdog: a frozen controller is killed (WatchdogSec=30s) and restarted"
pid=$(ct systemctl show -p MainPID --value dbgpt-controller.service)
ct systemctl kill --signal=SIGSTOP dbgpt-controller.service
restarts=0
for _ in $(seq 1 60); do
    restarts=$(ct systemctl show -p NRestarts --value dbgpt-controller.service)
    [ "$restarts" -ge 1 ] && [ "$(ct systemctl is-active dbgpt-controller.service || true)" = active ] && break
    sleep 1
done
[ "$restarts" -ge 1 ] || fail "the watchdog did not restart the frozen controller"
ct systemctl is-active dbgpt-controller.service
newpid=$(ct systemctl show -p MainPID --value dbgpt-controller.service)
[ "$newpid" != "$pid" ] || fail "same MainPID after the watchdog restart"
ct journalctl -u dbgpt-controller --no-pager | grep -F 'Watchdog timeout' ||
    fail "no watchdog timeout in the journal"
ct dbgpt ctl status | grep -Eq "^controller +8000 +$newpid " || fail "ctl status misses the restarted controller"

step "systemctl stop (graceful: SIGTERM, STOPPING=1, exit 0)"
ct systemctl stop dbgpt-controller.service
result=$(ct systemctl show -p Result --value dbgpt-controller.service)
[ "$result" = success ] || fail "stop result: $result"
ct test ! -e /run/dbgpt/controller || fail "/run/dbgpt/controller left behind"
ct journalctl -u dbgpt-controller --no-pager | tail -8

step "start again, then dpkg -r stops it and keeps the registry"
ct systemctl start dbgpt-controller.service
ct dpkg -r dbgpt
[ "$(ct systemctl is-active dbgpt-controller.service || true)" != active ] ||
    fail "dpkg -r left the controller running"
ct test -f /var/lib/dbgpt/registry.redb || fail "dpkg -r deleted the registry"

step "dpkg -P deletes it"
ct dpkg -P dbgpt
ct test ! -e /var/lib/dbgpt || fail "dpkg -P left /var/lib/dbgpt"

step "poweroff"
ct systemctl poweroff || true
for _ in $(seq 1 30); do kill -0 "$nsp" 2>/dev/null || break; sleep 1; done
step "all passed"
