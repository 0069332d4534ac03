#!/bin/sh
# After removal: systemd and the bus forget the units and policy; a purge
# also removes configuration and state.
set -e
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload || true
	busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig >/dev/null 2>&1 || true
fi
if [ "$1" = purge ]; then
	rm -rf /etc/pool-managerd /var/lib/pool-managerd /run/pool-managerd
	rm -f /var/lib/prometheus/node-exporter/pool-managerd.prom
fi
