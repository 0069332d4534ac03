#!/bin/sh
# postrm: after a removal systemd and the bus forget the units and policy,
# and the unit is masked as dh_installsystemd does (its enable links stay
# for a reinstall). A purge forgets the unit's enable state and removes the
# configuration and what the daemon made (its state files, staged models,
# digest cache, the record of the engines' own uids, runtime records,
# metrics textfile, the engines' cache directories), never the operator's
# models: ModelsDir= and ModelDirs= are left as they are, and so
# is the state directory itself while anything else is in it.
set -e
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload || true
	busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig >/dev/null 2>&1 || true
fi
case "$1" in
remove) deb-systemd-helper mask pool-managerd.service >/dev/null || true ;;
purge)
	deb-systemd-helper purge pool-managerd.service >/dev/null || true
	deb-systemd-helper unmask pool-managerd.service >/dev/null || true
	;;
esac
[ "$1" = purge ] || exit 0

# setting KEY DEFAULT: the last absolute KEY= of the manager file and its
# drop-ins, as the daemon reads them.
setting() {
	v=$2
	for f in /etc/pool-managerd/pool-managerd.conf /etc/pool-managerd/pool-managerd.conf.d/*.conf; do
		[ -f "$f" ] || continue
		w=$(sed -n "s|^[[:space:]]*$1[[:space:]]*=[[:space:]]*\(/[^[:space:]]*\)[[:space:]]*\$|\1|p" "$f" | tail -n 1)
		[ -z "$w" ] || v=$w
	done
	echo "$v"
}
state=$(setting StateDir /var/lib/pool-managerd)
textfile=$(setting MetricsTextfile /var/lib/prometheus/node-exporter/pool-managerd.prom)
cache=$(setting CacheDir /var/cache/pool-managerd)

# A CacheDir= of the operator's may hold more than the pools' directories:
# only those go, then the directory if empty. rm does not follow the links
# an engine user may have left in its own.
for f in /etc/pool-managerd/pools.d/*.pool; do
	[ -f "$f" ] || continue
	rm -rf "$cache/$(basename "$f" .pool)"
done
rmdir "$cache" 2>/dev/null || true
rm -rf /var/cache/pool-managerd

rm -rf "$state/staged" "$state/pools" "$state/digests.json" "$state/engine-users.json" "$state"/engine-users.json.*
rm -f "$textfile"
rm -rf /run/pool-managerd /etc/pool-managerd
# Empty directories only, and only those the package made: an operator's
# models keep theirs.
rmdir /var/lib/pool-managerd/models /var/lib/pool-managerd 2>/dev/null || true
if [ -d /var/lib/pool-managerd ]; then
	echo "pool-managerd: left /var/lib/pool-managerd: it holds files pool-managerd did not make (models?)" >&2
fi
