#!/bin/sh
# %postun ($1: 0 after removal, 1 after upgrade): systemd and the bus
# forget or reread the units and policy; then
# %systemd_postun_with_restart: after an upgrade the daemon is restarted
# only if it was running (try-restart; engines keep running), and never
# enabled or started otherwise.
set -e
[ -d /run/systemd/system ] || exit 0
systemctl daemon-reload || true
busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig >/dev/null 2>&1 || true
if [ "$1" -ge 1 ]; then
	systemctl try-restart pool-managerd.service || true
fi
