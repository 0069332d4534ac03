#!/bin/sh
# After install or upgrade: users, directories, catalog, units, bus policy,
# then the service (restarted on upgrade; engines keep running).
set -e
systemd-sysusers /usr/lib/sysusers.d/pool-managerd.conf
systemd-tmpfiles --create /usr/lib/tmpfiles.d/pool-managerd.conf
journalctl --update-catalog || true
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload
	# The bus must know the policy before the daemon asks for its name.
	busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig >/dev/null 2>&1 || true
	systemctl enable pool-managerd.service
	systemctl restart pool-managerd.service
fi
