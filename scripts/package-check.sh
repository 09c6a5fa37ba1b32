#!/usr/bin/env bash
# Checks the systemd units and the .deb/.rpm packages (run by scripts/test.sh, so on every
# CI run). Needs root: it installs the .deb on this machine, exercises it, and purges it.
#
#  1. tools: lintian, rpm, dpkg-dev, systemd-analyze (apt, only when missing); cargo-deb and
#     cargo-generate-rpm (cargo install into $DBGPT_CACHE_DIR/tools, once: ~15 min cold)
#  2. units: `systemd-analyze security --offline=yes` exposure <= 2.0 for each unit
#  3. maintainer scripts and RPM scriptlets: `sh -n`
#  4. scripts/build-dist.sh: binary, man pages, completions, .deb, .rpm
#  5. .deb: contents, conffiles, the scripts as packaged (`sh -n`), lintian with no warnings
#  6. dpkg -i: files, user, conffiles, nothing enabled, `systemd-analyze verify` of the
#     installed units silent, the packaged controller serving with the packaged config as
#     user dbgpt and `dbgpt ctl status` finding it
#  7. dpkg -r keeps the registry and the config; dpkg -P deletes both
#  8. .rpm: metadata, file list, config files, scriptlets, digests
#
# Idempotent: a package left by an interrupted run is purged first; the package, the dbgpt
# user (when this run created it) and temporary files are removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${DBGPT_CACHE_DIR:-$HOME/.cache/dbgpt-cluster}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$cache/target}
tools=$cache/tools
export PATH=$tools/bin:$PATH
dist=$CARGO_TARGET_DIR/dist
units=(dbgpt-controller.service dbgpt-worker@.service dbgpt-apiserver.service)
start_s=$SECONDS

step() { echo "== package-check: $*"; }
fail() { echo "package-check: FAILED: $*" >&2; exit 1; }

if [ "$(id -u)" != 0 ]; then
    # CI runs as root; a developer's unprivileged scripts/test.sh should not need sudo.
    echo "package-check: SKIPPED: needs root (it installs and purges the package)" >&2
    exit 0
fi

# ---------------------------------------------------------------- 1. tools
step "tools"
need_apt=()
command -v lintian >/dev/null || need_apt+=(lintian)
command -v rpm >/dev/null || need_apt+=(rpm)
command -v dpkg-shlibdeps >/dev/null || need_apt+=(dpkg-dev)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
command -v python3 >/dev/null || need_apt+=(python3)
# The package's dependencies, so that `dpkg -i` (which resolves nothing) can succeed.
[ -d /etc/ssl/certs ] && dpkg-query -W -f='${Status}' ca-certificates 2>/dev/null | grep -q 'ok installed' ||
    need_apt+=(ca-certificates)
command -v systemd-sysusers >/dev/null || need_apt+=(systemd)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "apt-get install ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${need_apt[@]}" >/dev/null ||
        { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${need_apt[@]}" >/dev/null; }
fi
install_tool() { # crate version binary
    if [ -x "$tools/bin/$3" ] && "$tools/bin/$3" --version 2>/dev/null | grep -qF "$2"; then
        return
    fi
    echo "cargo install $1@$2 (once; cached in $tools)"
    CARGO_TARGET_DIR=$tools/build CARGO_INSTALL_ROOT=$tools \
        cargo install --locked --quiet "$1@$2"
    rm -rf "$tools/build"
}
install_tool cargo-deb 3.8.0 cargo-deb
install_tool cargo-generate-rpm 0.21.1 cargo-generate-rpm

# ---------------------------------------------------------------- 2. unit hardening
step "systemd-analyze security (exposure must be <= 2.0)"
for u in "${units[@]}"; do
    out=$(systemd-analyze security --offline=yes --threshold=20 "systemd/$u" 2>&1) ||
        { echo "$out"; fail "$u: exposure above 2.0"; }
    echo "$out" | grep -F 'Overall exposure level'
done

# ---------------------------------------------------------------- 3. script syntax
step "sh -n on maintainer scripts and RPM scriptlets"
for f in packaging/deb/* packaging/rpm/*; do
    sh -n "$f" || fail "$f: syntax error"
done
grep -q '^#DEBHELPER#$' packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm ||
    fail "a maintainer script lacks a #DEBHELPER# line"
if grep -n '.#DEBHELPER#\|#DEBHELPER#.' packaging/deb/*; then
    fail "#DEBHELPER# must be alone on its line (cargo-deb replaces it anywhere, even in comments)"
fi

# ---------------------------------------------------------------- 4. build
step "build-dist"
scripts/build-dist.sh
deb=$(ls "$dist"/dbgpt_*.deb)
rpmf=$(ls "$dist"/dbgpt-*.rpm)

tmp=$(mktemp -d)
created_user=0
cleanup() {
    local rc=$?
    if dpkg-query -W -f='${Status}' dbgpt 2>/dev/null | grep -qv 'not-installed'; then
        dpkg -P dbgpt >/dev/null 2>&1 || true
    fi
    if [ "$created_user" = 1 ] && getent passwd dbgpt >/dev/null; then
        userdel dbgpt >/dev/null 2>&1 || true
        if getent group dbgpt >/dev/null; then groupdel dbgpt >/dev/null 2>&1 || true; fi
    fi
    rm -rf "$tmp"
    exit $rc
}
trap cleanup EXIT

# Files both packages must ship (each package adds its own below).
shipped=(/usr/bin/dbgpt
    /usr/lib/systemd/system/dbgpt-controller.service
    /usr/lib/systemd/system/dbgpt-worker@.service
    /usr/lib/systemd/system/dbgpt-apiserver.service
    /usr/lib/sysusers.d/dbgpt.conf
    /etc/dbgpt/controller.toml /etc/dbgpt/apiserver.toml /etc/dbgpt/worker-example.toml
    /usr/share/man/man1/dbgpt.1.gz /usr/share/bash-completion/completions/dbgpt
    /usr/share/fish/vendor_completions.d/dbgpt.fish
    /usr/share/dbgpt/grafana/dbgpt-cluster.json)

# ---------------------------------------------------------------- 5. .deb contents and lint
step "deb contents"
dpkg-deb -I "$deb"
dpkg-deb -c "$deb" | awk '{print $6}' | sed 's#^\./#/#' | sort >"$tmp/deb-files"
for f in "${shipped[@]}" /usr/share/man/man1/dbgpt-start-controller.1.gz \
    /usr/share/zsh/vendor-completions/_dbgpt \
    /usr/share/doc/dbgpt/copyright /usr/share/doc/dbgpt/changelog.Debian.gz; do
    grep -qxF "$f" "$tmp/deb-files" || fail "$f missing from $deb"
done
dpkg-deb -e "$deb" "$tmp/ctrl"
printf '/etc/dbgpt/apiserver.toml\n/etc/dbgpt/controller.toml\n/etc/dbgpt/worker-example.toml\n' >"$tmp/want-conffiles"
sort "$tmp/ctrl/conffiles" | diff -u "$tmp/want-conffiles" - || fail "conffiles differ"
for s in postinst prerm postrm; do
    test -f "$tmp/ctrl/$s" || fail "$s missing from the package"
    sh -n "$tmp/ctrl/$s" || fail "packaged $s: syntax error"
    if grep -q '#DEBHELPER#' "$tmp/ctrl/$s"; then fail "packaged $s still contains #DEBHELPER#"; fi
done
# Nothing may start a unit on install (upgrades only try-restart running ones), and the only
# `enable`s allowed are debhelper's "re-create the links of a unit that was enabled" ones.
if grep -E 'deb-systemd-invoke (start|restart) ' "$tmp/ctrl/postinst"; then
    fail "postinst starts a unit"
fi
[ "$(grep -c 'deb-systemd-helper enable' "$tmp/ctrl/postinst")" -le \
  "$(grep -c 'deb-systemd-helper --quiet was-enabled' "$tmp/ctrl/postinst")" ] ||
    fail "postinst enables a unit unconditionally"
grep -q 'systemd-sysusers.* dbgpt.conf' "$tmp/ctrl/postinst" || fail "postinst does not create the user"
grep -q 'deb-systemd-invoke stop' "$tmp/ctrl/prerm" || fail "prerm does not stop the units"
grep -q "deb-systemd-invoke stop 'dbgpt-worker@\*.service'" "$tmp/ctrl/prerm" || fail "prerm does not stop workers"

step "lintian"
# Suppressed, with reasons:
#  initial-upload-closes-no-bugs: the changelog has no Debian bug to close (not in Debian).
lrc=0
lintian --fail-on error,warning --suppress-tags initial-upload-closes-no-bugs "$deb" \
    >"$tmp/lintian.out" 2>&1 || lrc=$?
grep -v 'running with root privileges is not recommended' "$tmp/lintian.out" || true
[ "$lrc" = 0 ] || fail "lintian reported problems (above)"

# ---------------------------------------------------------------- 6. install
step "dpkg -i"
if dpkg-query -W -f='${Status}' dbgpt 2>/dev/null | grep -qv 'not-installed'; then
    echo "purging a dbgpt package left by an earlier run"
    dpkg -P dbgpt >/dev/null
fi
if [ -e /var/lib/dbgpt ]; then
    fail "/var/lib/dbgpt exists without the package; move it away first"
fi
getent passwd dbgpt >/dev/null || created_user=1
dpkg -i "$deb" >"$tmp/dpkg-i.log" 2>&1 || { cat "$tmp/dpkg-i.log"; fail "dpkg -i"; }
while read -r f; do
    case "$f" in */) continue ;; esac
    [ -e "$f" ] || [ -L "$f" ] || fail "$f not installed"
done < <(grep -v '/$' "$tmp/deb-files")
getent passwd dbgpt >/dev/null || fail "user dbgpt not created"
getent group dbgpt >/dev/null || fail "group dbgpt not created"
uid=$(id -u dbgpt)
[ "$uid" -lt 1000 ] || fail "dbgpt is not a system user (uid $uid)"
dpkg-query -W -f='${Conffiles}\n' dbgpt | awk 'NF {print $1}' | sort | diff -u "$tmp/want-conffiles" - ||
    fail "installed conffiles differ"
if ls /etc/systemd/system/*.wants/dbgpt-* 2>/dev/null; then
    fail "the package enabled a unit"
fi

step "systemd-analyze verify (installed units; any output fails)"
mkdir -p "$tmp/units"
ln -s /usr/lib/systemd/system/dbgpt-worker@.service "$tmp/units/dbgpt-worker@ci.service"
out=$(systemd-analyze verify --man=no /usr/lib/systemd/system/dbgpt-controller.service \
    /usr/lib/systemd/system/dbgpt-apiserver.service "$tmp/units/dbgpt-worker@ci.service" 2>&1) ||
    { echo "$out"; fail "systemd-analyze verify failed"; }
[ -z "$out" ] || { echo "$out"; fail "systemd-analyze verify printed warnings"; }

step "Grafana dashboard parses"
python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); assert d["panels"], "no panels"' \
    /usr/share/dbgpt/grafana/dbgpt-cluster.json || fail "the Grafana dashboard is not valid JSON"

step "default configs parse"
for f in /etc/dbgpt/*.toml; do
    python3 -c 'import sys, tomllib; tomllib.load(open(sys.argv[1], "rb"))' "$f" ||
        fail "$f is not valid TOML"
done

step "packaged controller with the packaged config, as user dbgpt, found by dbgpt ctl status"
# What the unit does, minus systemd: StateDirectory=dbgpt (0750, owned by dbgpt) and a
# private runtime directory. systemd's own run is covered by scripts/nspawn-test.sh.
install -d -o dbgpt -g dbgpt -m 0750 /var/lib/dbgpt "$tmp/run" "$tmp/log"
chmod 0711 "$tmp"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# (cd /: the daemon keeps its working directory, which user dbgpt may not be allowed to enter)
(cd / && runuser -u dbgpt -- env DBGPT_STATE_DIR=/var/lib/dbgpt DBGPT_RUNTIME_DIR="$tmp/run" \
    DBGPT_LOG_DIR="$tmp/log" /usr/bin/dbgpt start controller \
    --config /etc/dbgpt/controller.toml --host 127.0.0.1 --port "$port" --daemon) ||
    { cat "$tmp"/log/* 2>/dev/null || true; fail "packaged controller did not start"; }
DBGPT_RUNTIME_DIR="$tmp/run" /usr/bin/dbgpt ctl status | tee "$tmp/status"
grep -E "controller.*\b$port\b" "$tmp/status" >/dev/null ||
    fail "dbgpt ctl status does not show the controller on port $port"
DBGPT_RUNTIME_DIR="$tmp/run" /usr/bin/dbgpt ctl stop --port "$port"
[ -f /var/lib/dbgpt/registry.redb ] || fail "no registry in /var/lib/dbgpt"

# ---------------------------------------------------------------- 7. remove, purge
step "dpkg -r keeps the registry and the config"
dpkg -r dbgpt >"$tmp/dpkg-r.log" 2>&1 || { cat "$tmp/dpkg-r.log"; fail "dpkg -r"; }
[ ! -e /usr/bin/dbgpt ] || fail "/usr/bin/dbgpt still there after dpkg -r"
[ ! -e /usr/lib/systemd/system/dbgpt-controller.service ] || fail "unit still there after dpkg -r"
[ -f /var/lib/dbgpt/registry.redb ] || fail "dpkg -r deleted the registry"
[ -f /etc/dbgpt/controller.toml ] || fail "dpkg -r deleted the config"
dpkg-query -W -f='${Status}\n' dbgpt | grep -q 'config-files' || fail "not in config-files state"

step "dpkg -P deletes them"
dpkg -P dbgpt >"$tmp/dpkg-P.log" 2>&1 || { cat "$tmp/dpkg-P.log"; fail "dpkg -P"; }
[ ! -e /var/lib/dbgpt ] || fail "dpkg -P left /var/lib/dbgpt"
[ ! -e /etc/dbgpt ] || fail "dpkg -P left /etc/dbgpt"
if dpkg-query -W -f='${Status}' dbgpt 2>/dev/null | grep -qv 'not-installed'; then
    fail "package still known to dpkg after purge"
fi

# ---------------------------------------------------------------- 8. rpm
step "rpm"
rpm -qip "$rpmf" | tee "$tmp/rpm-info"
grep -q '^Name *: dbgpt$' "$tmp/rpm-info" || fail "rpm Name"
grep -q "^Version *: $(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)$" "$tmp/rpm-info" ||
    fail "rpm Version differs from Cargo.toml"
grep -q '^License *: MIT$' "$tmp/rpm-info" || fail "rpm License"
rpm -qlp "$rpmf" | sort >"$tmp/rpm-files"
for f in "${shipped[@]}" /usr/share/zsh/site-functions/_dbgpt; do
    grep -qxF "$f" "$tmp/rpm-files" || fail "$f missing from $rpmf"
done
rpm -qpR "$rpmf" | grep -q '^ca-certificates' || fail "rpm does not require ca-certificates"
rpm -qp --configfiles "$rpmf" | sort | diff -u "$tmp/want-conffiles" - || fail "rpm config files differ"
rpm -qp --scripts "$rpmf" >"$tmp/rpm-scripts"
for s in 'postinstall scriptlet' 'preuninstall scriptlet' 'postuninstall scriptlet'; do
    grep -q "^$s" "$tmp/rpm-scripts" || fail "rpm lacks its $s"
done
grep -q 'systemd-sysusers dbgpt.conf' "$tmp/rpm-scripts" || fail "rpm %post does not create the user"
if grep -v '^ *#' "$tmp/rpm-scripts" | grep -q 'systemctl.* enable'; then
    fail "rpm scriptlets enable a unit"
fi
rpm -Kv --nosignature "$rpmf" | tee "$tmp/rpm-k"
if grep -qi 'BAD\|NOT OK' "$tmp/rpm-k"; then fail "rpm digests"; fi
# rpm's install transaction (no scriptlets, not the host's database): files land as listed.
rpm --root "$tmp/rpmroot" --initdb
rpm --root "$tmp/rpmroot" -i --nodeps --noscripts --nosignature "$rpmf" >"$tmp/rpm-i.log" 2>&1 ||
    { cat "$tmp/rpm-i.log"; fail "rpm --root -i"; }
[ -x "$tmp/rpmroot/usr/bin/dbgpt" ] || fail "rpm --root install did not place /usr/bin/dbgpt"
rpm --root "$tmp/rpmroot" -e --noscripts dbgpt
[ ! -e "$tmp/rpmroot/usr/bin/dbgpt" ] || fail "rpm -e left /usr/bin/dbgpt"

if command -v rpmlint >/dev/null; then
    # Advisory only: cargo-generate-rpm cannot set Packager/Group/Changelog/BuildHost, and
    # rpmlint's default (openSUSE) profile wants bz2 man pages and its own license names.
    echo "rpmlint (advisory): $(rpmlint "$rpmf" 2>&1 | tail -1)"
fi

step "all passed in $((SECONDS - start_s)) s"
