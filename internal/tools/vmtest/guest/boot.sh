#!/bin/sh
# Baked into the image: mounts the payload disk that make vm-test made for
# this run, runs its check script within a time limit, then ends the boot.
# The check exits 100 to ask for a reboot; qemu runs with -no-reboot, so
# both end qemu, and the host boots the same disk again for the next phase.
p=/run/vm-payload
out=/dev/ttyS1
mkdir -p "$p"
if ! mount -o ro /dev/vdb "$p"; then
	echo "RESULT FAIL - mount-payload-disk 0" >"$out"
	systemctl poweroff
	exit 1
fi
limit=$(cat "$p/limit" 2>/dev/null || echo 300)
timeout --kill-after=10 "$limit" /bin/bash "$p/check.sh"
rc=$?
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
	echo "RESULT FAIL - guest-time-limit-${limit}s $limit" >"$out"
fi
if [ "$rc" = 100 ]; then
	systemctl reboot
else
	echo "GUEST END $rc" >"$out"
	systemctl poweroff
fi
