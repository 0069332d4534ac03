#!/bin/sh
# %post ($1: 1 on install, 2 on upgrade): users, directories, catalog, bus
# policy; then %systemd_post: on the first install the unit is enabled
# only if the host's presets say so (systemctl preset), and not started.
# An upgrade changes neither: %postun restarts what was running.
set -e
systemd-sysusers /usr/lib/sysusers.d/pool-managerd.conf
systemd-tmpfiles --create /usr/lib/tmpfiles.d/pool-managerd.conf
journalctl --update-catalog || true
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload || true
	busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig >/dev/null 2>&1 || true
fi
if [ "$1" -eq 1 ]; then
	systemctl --no-reload preset pool-managerd.service || true
fi
