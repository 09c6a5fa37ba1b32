# dbgpt %post: create the dbgpt system user, let systemd see the units. Enables and starts
# nothing (`systemctl enable --now dbgpt-controller` is the admin's choice).
if [ -x /usr/bin/systemd-sysusers ]; then
    systemd-sysusers dbgpt.conf >/dev/null 2>&1 || :
fi
if ! getent passwd dbgpt >/dev/null; then
    getent group dbgpt >/dev/null || groupadd --system dbgpt
    useradd --system --gid dbgpt --home-dir /var/lib/dbgpt --no-create-home \
        --shell /sbin/nologin --comment "DB-GPT model-serving daemons" dbgpt
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
