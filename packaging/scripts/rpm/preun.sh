#!/bin/sh
# %preun ($1: 0 on removal, 1 on upgrade): before a removal drain every
# pool, 30 s of leases at most each, then %systemd_preun: disable and stop
# the daemon; then stop whatever engine is left.
set -e
[ "$1" -eq 0 ] || exit 0
if [ -d /run/systemd/system ] && systemctl is-active --quiet pool-managerd.service; then
	pools=$(busctl call org.llorch.PoolManager1 /org/llorch/PoolManager1 org.llorch.PoolManager1.Manager ListPools 2>/dev/null |
		awk '{ for (i = 3; i <= NF; i += 2) { gsub(/"/, "", $i); print $i } }') || true
	for p in $pools; do
		busctl --timeout=90 call org.llorch.PoolManager1 /org/llorch/PoolManager1 \
			org.llorch.PoolManager1.Manager Drain st "$p" 30000 >/dev/null 2>&1 || true
	done
fi
systemctl --no-reload disable --now pool-managerd.service || true
[ -d /run/systemd/system ] || exit 0
systemctl stop 'pool-engine-*.scope' 2>/dev/null || true
