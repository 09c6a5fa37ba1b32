#!/usr/bin/env bash
# Opt-in full test of the .deb under a real systemd (not part of CI: ~2-3 min the first time to
# build the root file system, then ~1 min). Needs root, systemd-nspawn and debootstrap (apt
# installs them when missing), and the SmolLM2 GGUF (scripts/fetch-models.sh).
#
# Boots a Debian 12 container with systemd-nspawn (--private-network: the container has only
# its own loopback, so every port below is the container's and no traffic leaves it),
# installs the package, then:
#  - starts dbgpt-controller (Type=notify, hardened unit, User=dbgpt), checks that systemd saw
#    it ready, that `dbgpt ctl status` inside finds it under /run/dbgpt/controller/, that its
#    registry lives in /var/lib/dbgpt, and that the watchdog restarts it when frozen;
#  - copies the SmolLM2-135M GGUF to /var/lib/dbgpt/models, writes
#    /etc/dbgpt/worker-smollm2.toml and an API key in /etc/default/dbgpt-apiserver, starts
#    dbgpt-worker@smollm2 (llama.cpp under the unit's full sandbox) and dbgpt-apiserver with
#    its packaged config, waits until /v1/models lists smollm2, and checks that one greedy
#    chat completion through the apiserver answers "Paris" (and that a missing key gets 401);
#  - checks `dbgpt ctl status` lists the three daemons with their sockets in /run/dbgpt/<unit>/;
#  - stops the worker (its entries must turn unhealthy in the controller: deregistration),
#    the apiserver and the controller, each with Result=success;
#  - starts all three again, checks `dpkg -r` stops all three and keeps the registry, and
#    that `dpkg -P` deletes the state.
#
# The bookworm root file system is built once with debootstrap and cached in
# $DBGPT_CACHE_DIR/nspawn/bookworm.tar (rebuilt when the package list changes); every run
# unpacks a fresh copy.
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
model=${DBGPT_NSPAWN_MODEL:-$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf}
[ -f "$model" ] || fail "$model not found: run scripts/fetch-models.sh"
start_s=$SECONDS

need=()
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >/dev/null
fi

# The package's run-time dependencies (ca-certificates, libc6, systemd: the first of each
# "a | b" alternative), so dpkg -i works offline inside the container, plus curl for the
# HTTP checks.
deps=$(dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed 's/^ *//; s/[ (|].*//' | grep -v '^$' | paste -sd, -)
include=$(echo "systemd,systemd-sysv,dbus,curl,$deps" | tr ',' '\n' | awk '!seen[$0]++' | paste -sd, -)
img=$cache/nspawn/bookworm.tar
stamp=$cache/nspawn/bookworm.packages
if [ ! -f "$img" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$include" ]; then
    step "debootstrap bookworm (once; cached in $img)"
    mkdir -p "$cache/nspawn"
    build=$(mktemp -d /var/tmp/dbgpt-rootfs.XXXXXX)
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    debootstrap --variant=minbase --include="$include" \
        bookworm "$build" "${mirror:-http://deb.debian.org/debian}" >"$cache/nspawn/debootstrap.log" 2>&1 ||
        { tail -20 "$cache/nspawn/debootstrap.log"; rm -rf "$build"; fail "debootstrap"; }
    chmod 0755 "$build"
    tar -C "$build" -cf "$img.tmp" .
    mv "$img.tmp" "$img"
    echo "$include" >"$stamp"
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
# --private-network: a network namespace with only "lo" (the container's systemd brings it
# up), so ports 8000/8001/8100 cannot clash with the host's and nothing leaves the container.
systemd-nspawn -D "$root" --register=no --keep-unit --private-network --console=passive -b \
    >"$root.console.log" 2>&1 &
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

step "worker: SmolLM2 (llama.cpp) as dbgpt-worker@smollm2"
# The model lives in the state directory, readable by dbgpt only (ProtectHome=yes hides
# /root and /home from the units); dpkg -P deletes it with the rest of /var/lib/dbgpt.
ct install -d -o dbgpt -g dbgpt -m 0750 /var/lib/dbgpt/models
gguf=/var/lib/dbgpt/models/$(basename "$model")
cp "$model" "$root$gguf"
ct chown dbgpt:dbgpt "$gguf"
ct chmod 0640 "$gguf"
cat >"$root/etc/dbgpt/worker-smollm2.toml" <<EOF
# Written by scripts/nspawn-test.sh.
[worker]
port = 8001
controller_addr = "http://127.0.0.1:8000"

[[models.llms]]
name = "smollm2"
model_type = "llama.cpp"
model_path = "$gguf"
EOF
t0=$SECONDS
ct systemctl start dbgpt-worker@smollm2.service || {
    ct journalctl -u dbgpt-worker@smollm2 --no-pager | tail -30
    fail "start dbgpt-worker@smollm2"
}
echo "dbgpt-worker@smollm2 ready after $((SECONDS - t0))s"
ct systemctl show -p StatusText --value dbgpt-worker@smollm2.service

step "apiserver: packaged config, API key from /etc/default/dbgpt-apiserver"
key=nspawn-test-key
# Mode 0600, read by systemd as root (the packaged apiserver.toml is world-readable).
(umask 077 && echo "APISERVER_API_KEYS=$key" >"$root/etc/default/dbgpt-apiserver")
ct systemctl start dbgpt-apiserver.service || {
    ct journalctl -u dbgpt-apiserver --no-pager | tail -30
    fail "start dbgpt-apiserver"
}
ct systemctl show -p StatusText --value dbgpt-apiserver.service
auth=(-H "Authorization: Bearer $key")
models=
for _ in $(seq 1 30); do
    models=$(ct curl -sS --max-time 5 "${auth[@]}" http://127.0.0.1:8100/v1/models 2>&1 || true)
    echo "$models" | grep -Eq '"id": ?"smollm2"' && break
    sleep 1
done
echo "GET /v1/models: $models"
echo "$models" | grep -Eq '"id": ?"smollm2"' || {
    ct dbgpt model list --address http://127.0.0.1:8000 || true
    ct journalctl -u dbgpt-apiserver --no-pager | tail -20
    fail "/v1/models does not list smollm2 within 30 s"
}
code=$(ct curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8100/v1/models || true)
[ "$code" = 401 ] || fail "GET /v1/models without the API key: HTTP $code, want 401"

step "chat completion through the apiserver"
req='{"model":"smollm2","messages":[{"role":"user","content":"What is the capital of France?"}],"temperature":0,"max_tokens":24}'
t0=$SECONDS
answer=$(ct curl -sS --max-time 120 "${auth[@]}" -H 'Content-Type: application/json' \
    -d "$req" http://127.0.0.1:8100/v1/chat/completions) || {
    ct journalctl -u dbgpt-worker@smollm2 -u dbgpt-apiserver --no-pager | tail -30
    fail "POST /v1/chat/completions"
}
echo "POST /v1/chat/completions ($((SECONDS - t0))s): $answer"
echo "$answer" | grep -q Paris || fail "the answer does not contain Paris"

step "dbgpt ctl status: the three daemons"
out=$(ct dbgpt ctl status)
echo "$out"
echo "$out" | grep -Eq '^controller +8000 ' || fail "dbgpt ctl status does not list the controller"
echo "$out" | grep -Eq '^worker +8001 ' || fail "dbgpt ctl status does not list the worker"
echo "$out" | grep -Eq '^apiserver +8100 ' || fail "dbgpt ctl status does not list the apiserver"
ct test -S /run/dbgpt/worker-smollm2/worker-8001.sock || fail "no socket in /run/dbgpt/worker-smollm2"
ct test -S /run/dbgpt/apiserver/apiserver-8100.sock || fail "no socket in /run/dbgpt/apiserver"
ct dbgpt model list --address http://127.0.0.1:8000

# The worker's rows in `dbgpt model list` (port 8001), one "name@type healthy" each.
worker_rows() {
    ct dbgpt model list --address http://127.0.0.1:8000 |
        awk -F'|' '$5 ~ /^ *8001 *$/ { gsub(/ /, ""); print $2 "@" $3, $6 }'
}
rows=$(worker_rows)
echo "$rows" | grep -qx 'smollm2@llm True' || fail "smollm2@llm is not registered healthy"

stopped() { # UNIT RUNTIME-SUBDIR: stop it, check Result=success and that /run/dbgpt/SUBDIR is gone
    ct systemctl stop "$1"
    local result
    result=$(ct systemctl show -p Result --value "$1")
    echo "$1: Result=$result ExecMainStatus=$(ct systemctl show -p ExecMainStatus --value "$1")"
    [ "$result" = success ] || { ct journalctl -u "$1" --no-pager | tail -20; fail "$1 stop result: $result"; }
    ct test ! -e "/run/dbgpt/$2" || fail "/run/dbgpt/$2 left behind"
}

step "systemctl stop (graceful: SIGTERM, STOPPING=1, exit 0): worker first"
stopped dbgpt-worker@smollm2.service worker-smollm2
ct journalctl -u dbgpt-worker@smollm2 --no-pager | tail -6
rows=$(worker_rows)
echo "the controller's entries for the worker after it stopped:"
echo "$rows"
{ [ "$(echo "$rows" | grep -c ' False$')" -ge 2 ] && ! echo "$rows" | grep -q ' True$'; } ||
    fail "the worker's entries are not all unhealthy after it stopped (no deregistration)"
stopped dbgpt-apiserver.service apiserver
stopped dbgpt-controller.service controller
ct journalctl -u dbgpt-controller --no-pager | tail -4

step "start all three again, then dpkg -r stops them and keeps the registry"
ct systemctl start dbgpt-controller.service dbgpt-worker@smollm2.service dbgpt-apiserver.service
ct dbgpt ctl status
ct dpkg -r dbgpt
for u in dbgpt-worker@smollm2 dbgpt-apiserver dbgpt-controller; do
    [ "$(ct systemctl is-active "$u.service" || true)" != active ] || fail "dpkg -r left $u running"
done
ct test -f /var/lib/dbgpt/registry.redb || fail "dpkg -r deleted the registry"

step "dpkg -P deletes it"
ct dpkg -P dbgpt
ct test ! -e /var/lib/dbgpt || fail "dpkg -P left /var/lib/dbgpt"
ct test ! -e /etc/dbgpt/controller.toml || fail "dpkg -P left /etc/dbgpt/controller.toml"

step "poweroff"
ct systemctl poweroff || true
for _ in $(seq 1 30); do kill -0 "$nsp" 2>/dev/null || break; sleep 1; done
step "all passed in $((SECONDS - start_s))s"
