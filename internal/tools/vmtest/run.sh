#!/bin/bash
# make vm-test: the operator's walkthrough on real hosts. For the .deb and
# then the .rpm, boots a copy of the cached Debian 12 image under qemu
# (software emulation: systemd as PID 1, cgroup v2) twice: boot 1 installs
# and runs the checks, boot 2 is the reboot (pools back, breaker state kept)
# and the removal. Then the .deb once on Debian sid, supervising Debian's
# own llama-server (guest/check-sid.sh). The sid image is built while the
# bookworm guests run. The guest reports on its second serial port; each
# check is printed as it finishes, and a summary at the end. Exits non-zero
# when any check fails or a boot does not finish. In the .deb's second boot
# this host runs poolctl -H against the guest's sshd through a port that
# qemu forwards (remote_check).
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

qpid= tpid= rpid= qemu_pidfile=
stop_qemu() {
	[ -n "${sid_pid:-}" ] && kill "$sid_pid" 2>/dev/null || true
	[ -n "$rpid" ] && kill "$rpid" 2>/dev/null || true
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
	qpid= tpid= rpid=
}
trap stop_qemu EXIT
trap 'echo "vm-test: interrupted"; exit 130' INT TERM HUP

if [ "$(id -u)" != 0 ]; then
	echo "vm-test: needs root (debootstrap, mkfs.ext4 -d of a root file system)" >&2
	exit 1
fi
for tool in qemu-system-x86_64 debootstrap mkfs.ext4 timeout ssh ssh-keygen; do
	if ! command -v "$tool" >/dev/null; then
		echo "vm-test: $tool missing: apt-get install -y --no-install-recommends qemu-system-x86 debootstrap e2fsprogs openssh-client" >&2
		exit 1
	fi
done
# The newest packages: what make packages has just built.
deb=$(ls -t build/pool-managerd_*.deb 2>/dev/null | head -n 1)
rpm=$(ls -t build/pool-managerd-*.rpm 2>/dev/null | head -n 1)
if [ -z "$deb" ] || [ -z "$rpm" ] || [ ! -x build/pool-engine-sim ] || [ ! -x build/poolctl ]; then
	echo "vm-test: build/ lacks the packages, pool-engine-sim or poolctl: run make packages" >&2
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

# free_port: a port of this host's loopback that nobody listens on.
free_port() {
	local p
	for _ in $(seq 100); do
		p=$((20000 + RANDOM % 40000))
		if ! (exec 9<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
			echo "$p"
			return 0
		fi
	done
	echo "vm-test: no free port on 127.0.0.1" >&2
	return 1
}

# ssh_setup WORK: for poolctl -H from here, a throwaway key (its public
# half goes to the guest on the payload disk), a config that uses it and
# takes the guest's host key unseen (each image makes new ones), and an
# ssh first on PATH that reads that config: poolctl runs "ssh" as
# systemctl -H does.
ssh_setup() {
	local dir=$top/$1/ssh real
	real=$(command -v ssh)
	mkdir -p "$dir/bin"
	ssh-keygen -q -t ed25519 -N '' -C vm-test -f "$dir/key"
	cat >"$dir/config" <<-EOF
		Host *
			IdentityFile $dir/key
			IdentitiesOnly yes
			BatchMode yes
			StrictHostKeyChecking no
			UserKnownHostsFile /dev/null
			LogLevel ERROR
			ConnectTimeout 30
	EOF
	printf '#!/bin/sh\nexec "%s" -F "%s" "$@"\n' "$real" "$dir/config" >"$dir/bin/ssh"
	chmod 0755 "$dir/bin/ssh"
	cp "$dir/key.pub" "$1/payload/remote.pub"
}

# The host's side of poolctl -H: checks reported as the guest reports its
# own (into a log of their own), with this host's poolctl and ssh.
hfails=0
hwant() {
	if [ "$2" = "$3" ]; then
		echo "ok: $1 = $2"
	else
		echo "MISMATCH: $1: got '$2', want '$3'"
		hfails=$((hfails + 1))
	fi
}
hwant_match() {
	if printf '%s' "$2" | grep -Eq -- "$3"; then
		echo "ok: $1 ~ $3"
	else
		echo "MISMATCH: $1: got '$2', want a match of /$3/"
		hfails=$((hfails + 1))
	fi
}
# rpoolctl ARGS...: build/poolctl with the throwaway ssh, bounded; stdout
# in $out, stderr in $err, exit status in $code.
rpoolctl() {
	local e
	e=$(mktemp)
	out=$(PATH="$sshdir/bin:$PATH" timeout 60 build/poolctl "$@" 2>"$e")
	code=$?
	err=$(cat "$e")
	rm -f "$e"
}
# hcheck LOG NAME FUNCTION
hcheck() {
	local log=$1 name=$2 t0 dt rc
	t0=$(date +%s.%N)
	hfails=0
	"$3" >"$log.out" 2>&1
	rc=$?
	[ "$hfails" -eq 0 ] || rc=1
	dt=$(elapsed "$t0")
	if [ "$rc" -eq 0 ]; then
		printf 'RESULT\tPASS\t%s\t%s\n' "$dt" "$name"
	else
		printf 'RESULT\tFAIL\t%s\t%s\n' "$dt" "$name"
		sed 's/^/DETAIL\t/' "$log.out"
	fi | tee -a "$log" | show
}

h_list() {
	rpoolctl -H "$guest" list
	hwant "exit status" "$code" 0
	hwant_match "llama8b" "$out" '^llama8b +ready +yes '
	hwant_match "embed" "$out" '^embed +ready +yes '
	hwant_match "count" "$out" '^2 pools listed\.$'
	echo "stderr: $err"
}
h_fleet() {
	local h=${guest//./\\.}
	rpoolctl -H "$guest,$guest" list
	hwant "exit status" "$code" 0
	hwant_match "HOST column" "$out" '^HOST +POOL +STATE +READY'
	hwant "llama8b rows" "$(printf '%s\n' "$out" | grep -Ec "^$h +llama8b +ready +yes ")" 2
	hwant "embed rows" "$(printf '%s\n' "$out" | grep -Ec "^$h +embed +ready +yes ")" 2
	hwant_match "count" "$out" '^4 pools listed\.$'
	echo "stderr: $err"
}
h_fleet_down() {
	local h=${guest//./\\.}
	rpoolctl -H "$guest,$dead" list
	hwant "exit status" "$code" 1
	hwant_match "the reachable host's pools" "$out" "^$h +llama8b +ready +yes "
	hwant_match "ssh's refusal" "$err" 'Connection refused'
	hwant_match "the host that could not be read" "$err" "^poolctl: ${dead//./\\.}: "
	hwant_match "the count" "$err" '^poolctl: 1 of 2 hosts could not be read$'
}
h_status() {
	rpoolctl -H "$guest" status llama8b
	hwant "exit status" "$code" 0
	# vmtest: the guest's host name, so the journal is the guest's.
	hwant_match "the scope's journal, read over ssh" "$out" ' vmtest pool-engine-sim\[[0-9]+\]: '
	hwant_match "the daemon's journal of the pool" "$out" 'engine ready'
	echo "stderr: $err"
}
h_trust() {
	local user=vmremote@${guest#root@}
	rpoolctl -H "$user" list
	hwant "an unprivileged user's list: exit status" "$code" 0
	hwant_match "an unprivileged user's list" "$out" '^embed +ready +yes '
	rpoolctl -H "$user" stop embed --now
	hwant "an unprivileged user's stop: exit status" "$code" 1
	hwant_match "an unprivileged user's stop: refused" "$err" 'org\.freedesktop\.DBus\.Error\.AccessDenied'
	# root's own changes over -H are left out: the upgrade check that
	# follows wants the pools as the reboot checks left them.
	rpoolctl -H "$guest" show embed -p State --value
	hwant "embed State after the refusal, as root sees it" "$out" ready
	echo "stderr: $err"
}

# remote_check RESULTS LOG PORT DEADPORT: once the guest says its sshd is
# up ("REMOTE READY" on its report), poolctl -H from here through qemu's
# forward of PORT; DEADPORT has no listener. Then the guest goes on.
remote_check() {
	local results=$1 log=$2 guest=root@127.0.0.1:$3 dead=root@127.0.0.1:$4 t0
	# A check's failure is its report, not the end of this subshell.
	set +e +o pipefail
	: >"$log"
	until tr -d '\r' <"$results" | grep -q '^REMOTE	READY'; do
		if ! kill -0 "$qpid" 2>/dev/null || tr -d '\r' <"$results" | grep -Eq '^(PHASE|GUEST END)'; then
			printf 'RESULT\tFAIL\t0\tfrom the host: poolctl -H (the guest never said its sshd was up)\n' | tee -a "$log" | show
			return 0
		fi
		sleep 0.5
	done
	t0=$(date +%s.%N)
	hcheck "$log" "from the host: poolctl -H root@GUEST:PORT list (real ssh, the guest's systemd-stdio-bridge and system bus)" h_list
	hcheck "$log" "from the host: poolctl -H GUEST,GUEST list, one table with a HOST column" h_fleet
	hcheck "$log" "from the host: poolctl -H GUEST,DOWN list: the reachable host's pools, the other named, exit 1" h_fleet_down
	hcheck "$log" "from the host: poolctl -H status reads the guest's journal over ssh" h_status
	hcheck "$log" "from the host: -H as an unprivileged user reads but may not stop" h_trust
	if ! timeout 60 "$sshdir/bin/ssh" -p "$3" root@127.0.0.1 touch /run/vm-check-remote >"$log.out" 2>&1; then
		{ printf 'RESULT\tFAIL\t0\tfrom the host: ssh could not tell the guest to go on\n'; sed 's/^/DETAIL\t/' "$log.out"; } | tee -a "$log" | show
	fi
	printf 'INFO\tpoolctl -H checks from the host: %ss\n' "$(elapsed "$t0")" | tee -a "$log" | show
}

summary=()
failed=0
# boot KIND N IMAGE [PORT]: one qemu run on the disk of KIND; its report
# in results-N.log. With PORT, the guest has a user-mode NIC (restrict=on:
# it reaches nothing) with PORT of this host's loopback forwarded to its
# sshd, and remote_check runs beside it.
boot() {
	local kind=$1 n=$2 img=$3 port=${4:-} work=build/vm/run-$1 t0 rc=0 nic=none
	local results=$work/results-$n.log console=$work/console-$n.log
	[ -z "$port" ] || nic="user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:$port-:22"
	qemu_pidfile=$work/qemu-$n.pid
	rm -f "$results" "$qemu_pidfile"
	: >"$results"
	echo "== .$kind, boot $n (qemu -accel tcg; console in $console)"
	t0=$(date +%s.%N)
	timeout --kill-after=10 "$boot_timeout" qemu-system-x86_64 \
		-accel tcg -m 2048 -smp 2 -nographic -no-reboot -nic "$nic" \
		-kernel "$img/vmlinuz" -initrd "$img/initrd.img" \
		-append "root=/dev/vda rw console=ttyS0 panic=-1" \
		-drive "file=$work/disk.img,format=raw,if=virtio" \
		-drive "file=$work/payload.img,format=raw,if=virtio,readonly=on" \
		-serial mon:stdio -serial "file:$results" -pidfile "$qemu_pidfile" \
		</dev/null >"$console" 2>&1 &
	qpid=$!
	tail -n +1 -F --pid="$qpid" "$results" 2>/dev/null | show &
	tpid=$!
	if [ -n "$port" ]; then
		remote_check "$results" "$work/remote-$n.log" "$port" "$(free_port)" &
		rpid=$!
	fi
	wait "$qpid" || rc=$?
	qpid=
	wait "$tpid" 2>/dev/null || true
	tpid=
	if [ -n "$rpid" ]; then
		wait "$rpid" 2>/dev/null || true
		rpid=
	fi
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
	kimg=$img boots=2 limit=$guest_limit port2=
	case $kind in
	deb)
		cp "$deb" "$work/payload/pool-managerd.deb"
		cp build/vm/pool-engine-sim.tar "$work/payload/"
		sshdir=$top/$work/ssh
		ssh_setup "$work"
		port2=$(free_port)
		# The host's poolctl -H checks run within boot 2's limit.
		limit=$((guest_limit + 90))
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
	[ "$ok" = 0 ] || [ "$boots" = 1 ] || boot "$kind" 2 "$kimg" "$port2" || ok=0
	[ "$ok" = 1 ] || failed=1
	for log in "$work/results-1.log" "$work/results-2.log" "$work/remote-2.log"; do
		[ -f "$log" ] || continue
		while IFS=$'\t' read -r tag verdict secs name; do
			[ "$tag" = RESULT ] || continue
			summary+=("$(printf '%-4s %6ss  .%s: %s' "$verdict" "$secs" "$kind" "$name")")
			[ "$verdict" = PASS ] || failed=1
		done < <(tr -d '\r' <"$log")
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
