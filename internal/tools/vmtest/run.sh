#!/bin/bash
# make vm-test: the operator's walkthrough on real hosts. For the .deb and
# then the .rpm, boots a copy of the cached Debian 12 image under qemu
# (software emulation: systemd as PID 1, cgroup v2) twice: boot 1 installs
# and runs the checks, boot 2 is the reboot (pools back, breaker state kept)
# and the removal. Then the .deb once on Debian sid, supervising Debian's
# own llama-server (guest/check-sid.sh). The sid image is built while the
# bookworm guests run. The guest reports on its second serial port; each
# check is printed as it finishes, and a summary at the end. Exits non-zero
# when any check fails or a boot does not finish.
#
#   internal/tools/vmtest/run.sh [deb] [rpm] [sid]     (all by default; root needed)
#   VM_BOOT_TIMEOUT=420  seconds one qemu run may take
#   VM_MIRROR=URL        Debian mirror for a new image (default: apt's)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../../.." && pwd)
cd "$top"
GO=${GO:-go}
boot_timeout=${VM_BOOT_TIMEOUT:-840}
# One boot's checks: the .deb's first boot (podman, the upgrade, the
# operator's habits) takes about 4 min on a quiet 2-core host.
guest_limit=${VM_GUEST_LIMIT:-540}
# The real engine under software emulation is slower than the simulator.
sid_limit=${VM_SID_LIMIT:-720}
kinds=("$@")
[ ${#kinds[@]} -gt 0 ] || kinds=(deb rpm sid)

start_all=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

qpid= tpid= qemu_pidfile=
stop_qemu() {
	[ -n "${sid_pid:-}" ] && kill "$sid_pid" 2>/dev/null || true
	[ -n "$tpid" ] && kill "$tpid" 2>/dev/null || true
	if [ -n "$qpid" ]; then
		kill "$qpid" 2>/dev/null || true
		for _ in 1 2 3 4 5 6 7 8 9 10; do
			kill -0 "$qpid" 2>/dev/null || break
			sleep 0.5
		done
		if [ -n "$qemu_pidfile" ] && [ -s "$qemu_pidfile" ]; then
			kill -KILL "$(cat "$qemu_pidfile")" 2>/dev/null || true
		fi
		kill -KILL "$qpid" 2>/dev/null || true
		wait "$qpid" 2>/dev/null || true
	fi
	qpid= tpid=
}
trap stop_qemu EXIT
trap 'echo "vm-test: interrupted"; exit 130' INT TERM HUP

if [ "$(id -u)" != 0 ]; then
	echo "vm-test: needs root (debootstrap, mkfs.ext4 -d of a root file system)" >&2
	exit 1
fi
for tool in qemu-system-x86_64 debootstrap mkfs.ext4 timeout; do
	if ! command -v "$tool" >/dev/null; then
		echo "vm-test: $tool missing: apt-get install -y --no-install-recommends qemu-system-x86 debootstrap e2fsprogs" >&2
		exit 1
	fi
done
# The newest packages: what make packages has just built.
deb=$(ls -t build/pool-managerd_*.deb 2>/dev/null | head -n 1)
rpm=$(ls -t build/pool-managerd-*.rpm 2>/dev/null | head -n 1)
if [ -z "$deb" ] || [ -z "$rpm" ] || [ ! -x build/pool-engine-sim ]; then
	echo "vm-test: build/ lacks the packages or pool-engine-sim: run make packages" >&2
	exit 1
fi

mkdir -p build/vm
# sid's image is network-bound (debootstrap): it is made beside the
# bookworm boots.
sid_pid=
case " ${kinds[*]} " in
*" sid "*)
	"$here/build-image.sh" sid >build/vm/sid-image.path 2>build/vm/sid-image.log &
	sid_pid=$!
	;;
esac
img=$("$here/build-image.sh")
image_s=$(elapsed "$start_all")
CGO_ENABLED=0 "$GO" build -o build/vm/router ./internal/tools/vmtest/router
# The simulator as a container image for the .deb boot's podman engine: a
# root holding its static binary and, as real images have (su, passwd), a
# set-user-ID file; imported in the guest (nothing is pulled there).
rm -rf build/vm/sim-image
mkdir -p build/vm/sim-image/usr/bin build/vm/sim-image/tmp
chmod 1777 build/vm/sim-image/tmp
install -m 4755 /dev/null build/vm/sim-image/usr/bin/setuid-file
CGO_ENABLED=0 "$GO" build -trimpath -ldflags "-s -w" -o build/vm/sim-image/usr/bin/pool-engine-sim ./cmd/pool-engine-sim
tar -C build/vm/sim-image --owner=0 --group=0 --numeric-owner -cf build/vm/pool-engine-sim.tar .

# One line of the guest's report, for the terminal.
show() {
	tr -d '\r' | awk -F'\t' '
		$1 == "RESULT" { printf "  %-4s %6ss  %s\n", $2, $3, $4; fflush(); next }
		$1 == "DETAIL" { printf "               | %s\n", $2; fflush(); next }
		$1 == "INFO" { printf "        info: %s\n", $2; fflush(); next }
		$1 == "PHASE" { printf "  -- boot %s done\n", $2; fflush(); next }'
}

summary=()
failed=0
# boot KIND N IMAGE: one qemu run on the disk of KIND; its report in
# results-N.log.
boot() {
	local kind=$1 n=$2 img=$3 work=build/vm/run-$1 t0 rc=0
	local results=$work/results-$n.log console=$work/console-$n.log
	qemu_pidfile=$work/qemu-$n.pid
	rm -f "$results" "$qemu_pidfile"
	: >"$results"
	echo "== .$kind, boot $n (qemu -accel tcg; console in $console)"
	t0=$(date +%s.%N)
	timeout --kill-after=10 "$boot_timeout" qemu-system-x86_64 \
		-accel tcg -m 2048 -smp 2 -nographic -no-reboot -nic none \
		-kernel "$img/vmlinuz" -initrd "$img/initrd.img" \
		-append "root=/dev/vda rw console=ttyS0 panic=-1" \
		-drive "file=$work/disk.img,format=raw,if=virtio" \
		-drive "file=$work/payload.img,format=raw,if=virtio,readonly=on" \
		-serial mon:stdio -serial "file:$results" -pidfile "$qemu_pidfile" \
		</dev/null >"$console" 2>&1 &
	qpid=$!
	tail -n +1 -F --pid="$qpid" "$results" 2>/dev/null | show &
	tpid=$!
	wait "$qpid" || rc=$?
	qpid=
	wait "$tpid" 2>/dev/null || true
	tpid=
	local took
	took=$(elapsed "$t0")
	summary+=("$(printf '%-4s %6ss  .%s boot %s (qemu, boot to poweroff)' "" "$took" "$kind" "$n")")
	if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
		echo "vm-test: qemu ran past ${boot_timeout}s and was stopped; console tail:"
		tail -n 40 "$console" | tr -d '\r'
		return 1
	fi
	if ! tr -d '\r' <"$results" | grep -q "^PHASE	$n	DONE"; then
		echo "vm-test: boot $n of the .$kind did not finish its checks (qemu exit $rc); console tail:"
		tail -n 40 "$console" | tr -d '\r'
		return 1
	fi
}

for kind in "${kinds[@]}"; do
	work=build/vm/run-$kind
	rm -rf "$work"
	mkdir -p "$work/payload"
	kimg=$img boots=2 limit=$guest_limit
	case $kind in
	deb)
		cp "$deb" "$work/payload/pool-managerd.deb"
		cp build/vm/pool-engine-sim.tar "$work/payload/"
		;;
	rpm) cp "$rpm" "$work/payload/pool-managerd.rpm" ;;
	sid)
		if ! wait "$sid_pid"; then
			echo "vm-test: the sid image could not be made:"
			tail -n 30 build/vm/sid-image.log
			summary+=("FAIL         sid image ($(tail -n 1 build/vm/sid-image.log))")
			failed=1
			continue
		fi
		kimg=$(cat build/vm/sid-image.path)
		echo "$(tail -n 1 build/vm/sid-image.log)"
		cp "$deb" "$work/payload/pool-managerd.deb"
		boots=1 limit=$sid_limit
		;;
	*)
		echo "vm-test: unknown kind $kind (deb, rpm or sid)" >&2
		exit 2
		;;
	esac
	cp --sparse=always "$kimg/disk.img" "$work/disk.img"
	cp build/vm/router "$here/guest/lib.sh" "$work/payload/"
	if [ "$kind" = sid ]; then
		# No simulator in this guest: Debian's llama-server is the engine.
		cp "$here/guest/check-sid.sh" "$work/payload/check.sh"
		cp "$here/guest/tiny-gguf.py" "$work/payload/"
	else
		cp build/pool-engine-sim "$here/guest/check.sh" "$work/payload/"
	fi
	echo "$kind" >"$work/payload/kind"
	echo "$limit" >"$work/payload/limit"
	truncate -s 64M "$work/payload.img"
	mkfs.ext4 -q -F -L payload -d "$work/payload" "$work/payload.img"
	ok=1
	boot "$kind" 1 "$kimg" || ok=0
	[ "$ok" = 0 ] || [ "$boots" = 1 ] || boot "$kind" 2 "$kimg" || ok=0
	[ "$ok" = 1 ] || failed=1
	for n in 1 2; do
		[ -f "$work/results-$n.log" ] || continue
		while IFS=$'\t' read -r tag verdict secs name; do
			[ "$tag" = RESULT ] || continue
			summary+=("$(printf '%-4s %6ss  .%s: %s' "$verdict" "$secs" "$kind" "$name")")
			[ "$verdict" = PASS ] || failed=1
		done < <(tr -d '\r' <"$work/results-$n.log")
	done
	# The disk copy is 3 GiB of mostly holes; the logs stay for a look.
	rm -f "$work/disk.img" "$work/payload.img"
done

echo
echo "== make vm-test summary"
printf '%s\n' "${summary[@]}"
echo "image: $(basename "$img") ready in ${image_s}s; total $(elapsed "$start_all")s"
if [ "$failed" != 0 ]; then
	echo "vm-test: FAILED"
	exit 1
fi
echo "vm-test: all checks passed"
