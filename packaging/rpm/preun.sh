# dbgpt %preun: on erase ($1 = 0, not upgrade), stop the workers, then the API server and the
# controller, and disable them. /var/lib/dbgpt (the registry) is kept, as RPM keeps state.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl stop 'dbgpt-worker@*.service' >/dev/null 2>&1 || :
    systemctl --no-reload disable --now dbgpt-apiserver.service dbgpt-controller.service >/dev/null 2>&1 || :
    rm -f /etc/systemd/system/multi-user.target.wants/dbgpt-worker@*.service
fi
