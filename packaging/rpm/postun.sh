# dbgpt %postun: reload units; on upgrade ($1 >= 1) restart the services that were running.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart dbgpt-controller.service dbgpt-apiserver.service 'dbgpt-worker@*.service' >/dev/null 2>&1 || :
    fi
fi
