# dbgpt %postun: reload units; on upgrade ($1 >= 1) reload the services that were running:
# ExecReload= runs `dbgpt ctl upgrade`, a handover to the new binary that drops no request (a
# daemon too old to hand over is restarted instead).
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        for u in dbgpt-controller.service 'dbgpt-worker@*.service' dbgpt-apiserver.service; do
            systemctl try-reload-or-restart "$u" >/dev/null 2>&1 ||
                systemctl try-restart "$u" >/dev/null 2>&1 || :
        done
    fi
fi
