#!/bin/sh
# prerm: before a removal (not an upgrade) drain every pool, 30 s of leases
# at most each, then stop the daemon and whatever engine is left. The unit
# stays enabled, as dh_installsystemd leaves it: postrm masks it, a purge
# forgets it, a reinstall enables it again only if it was.
set -e
case "$1" in
remove | purge) ;;
*) exit 0 ;;
esac
[ -d /run/systemd/system ] || exit 0
if systemctl is-active --quiet pool-managerd.service; then
	pools=$(busctl call org.llorch.PoolManager1 /org/llorch/PoolManager1 org.llorch.PoolManager1.Manager ListPools 2>/dev/null |
		awk '{ for (i = 3; i <= NF; i += 2) { gsub(/"/, "", $i); print $i } }') || true
	for p in $pools; do
		busctl --timeout=90 call org.llorch.PoolManager1 /org/llorch/PoolManager1 \
			org.llorch.PoolManager1.Manager Drain st "$p" 30000 >/dev/null 2>&1 || true
	done
fi
deb-systemd-invoke stop pool-managerd.service >/dev/null || true
systemctl stop 'pool-engine-*.scope' 2>/dev/null || true
