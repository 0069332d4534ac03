#!/bin/sh
# postinst (configure [OLD-VERSION] | abort-*): users, directories, catalog,
# bus policy, then the service as dh_installsystemd does it: enabled on
# the first install only (an operator's disable survives upgrades), started
# on the first install, and on an upgrade restarted only if it was running
# (engines keep running). deb-systemd-invoke asks policy-rc.d first.
set -e
unit=pool-managerd.service
case "$1" in
configure | abort-upgrade | abort-deconfigure | abort-remove) ;;
*) exit 0 ;;
esac
systemd-sysusers /usr/lib/sysusers.d/pool-managerd.conf
systemd-tmpfiles --create /usr/lib/tmpfiles.d/pool-managerd.conf
journalctl --update-catalog || true

# Only masks deb-systemd-helper made at removal go.
deb-systemd-helper unmask "$unit" >/dev/null || true
if [ -n "$2" ] && ! deb-systemd-helper debian-installed "$unit"; then
	# An upgrade from a package that enabled the unit itself: keep what
	# the operator has now, enabled or not.
	deb-systemd-helper update-state "$unit" >/dev/null || true
elif deb-systemd-helper --quiet was-enabled "$unit"; then
	# True on a first install (then systemctl preset decides); on an
	# upgrade only while the operator left it enabled.
	deb-systemd-helper enable "$unit" >/dev/null || true
else
	deb-systemd-helper update-state "$unit" >/dev/null || true
fi

if [ -d /run/systemd/system ]; then
	systemctl --system daemon-reload >/dev/null || true
	# The bus must know the policy before the daemon asks for its name.
	busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig >/dev/null 2>&1 || true
	if [ -n "$2" ]; then
		deb-systemd-invoke try-restart "$unit" >/dev/null || true
	else
		# deb-systemd-invoke starts only an enabled unit.
		deb-systemd-invoke start "$unit" >/dev/null || true
	fi
fi
