#!/bin/bash
# The operator's walkthrough on a real host (make vm-test), run as root by
# the guest's vm-check.service from the payload disk. Boot 1: install the
# package, two simulator pools on fake GPUs, the checks, then a reboot
# (exit 100). Boot 2: the pools come back with their breaker state, then the
# package is removed (and purged). Results go to the second serial port,
# one line each:
#   RESULT <TAB> PASS|FAIL <TAB> seconds <TAB> name
#   DETAIL <TAB> text      (why a check failed)
#   INFO <TAB> text        (what the host reported, for the record)
# Every wait is bounded; boot.sh bounds the whole script.
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

# ---------------------------------------------------------------- boot 1

c_host() {
	want "PID 1" "$(cat /proc/1/comm)" systemd
	want "cgroup filesystem" "$(stat -fc %T /sys/fs/cgroup)" cgroup2fs
	info "kernel $(uname -r); $(systemctl --version | head -n 1); cgroup $(stat -fc %T /sys/fs/cgroup); $(nproc) CPUs under qemu -accel tcg"
}

c_install() {
	case $KIND in
	deb) want_ok "dpkg -i" timeout 120 dpkg -i "$P/pool-managerd.deb" ;;
	rpm)
		want_ok "rpm -i --nodeps" timeout 120 rpm -i --nodeps "$P/pool-managerd.rpm"
		# %systemd_post: enabled as the presets say (Debian's enable what
		# they do not name), started by the operator.
		want "not started by rpm" "$(systemctl is-active pool-managerd)" inactive
		want_ok "systemctl start pool-managerd" timeout 60 systemctl start pool-managerd
		;;
	esac
	want "pool-managerd.service" "$(systemctl is-active pool-managerd)" active
	want "enabled" "$(systemctl is-enabled pool-managerd)" enabled
	want_ok "group pool-engine (the engines' supplementary group)" getent group pool-engine
	want_ok "group pool-admin" getent group pool-admin
	want_ok "bus name owned" busctl --timeout=10 status "$B"
}

c_configure() {
	# The fake GPUs: character nodes of the NVIDIA major that no driver
	# backs (open gives ENXIO where the device program allows it). tmpfiles
	# makes them again on the next boot, as the driver would.
	cat >/etc/tmpfiles.d/vm-fake-gpus.conf <<-'EOF'
		c /dev/nvidia0 0666 root root - 195:0
		c /dev/nvidia1 0666 root root - 195:1
		c /dev/nvidiactl 0666 root root - 195:255
	EOF
	want_ok "fake GPU nodes" systemd-tmpfiles --create /etc/tmpfiles.d/vm-fake-gpus.conf
	install -m 0755 "$P/pool-engine-sim" /usr/local/bin/pool-engine-sim
	printf 'GGUF\003\000\000\000 llama 3 8b q4' >"$MODELS/llama-3-8b-q4.gguf"
	printf 'GGUF\003\000\000\000 llama 3 8b q5' >"$MODELS/llama-3-8b-q5.gguf"
	printf 'GGUF\003\000\000\000 nomic embed' >"$MODELS/nomic-embed.gguf"
	printf 'PK\003\004 not a model' >"$MODELS/broken.gguf"
	cat >/etc/pool-managerd/pool-managerd.conf.d/gpus.conf <<-'EOF'
		[Inventory]
		Device=0 GPU-8f2c1a70-0000-4000-8000-000000000000 /dev/nvidia0
		Device=1 GPU-8f2c1a70-0000-4000-8000-000000000001 /dev/nvidia1
		ControlDevice=/dev/nvidiactl
	EOF
	cat >/etc/pool-managerd/pools.d/llama8b.pool <<-'EOF'
		[Pool]
		Description=Llama 3 8B on GPU 0
		Devices=0
		Model=llama-3-8b-q4.gguf
		Slots=4
		[Engine]
		ExecStart=/usr/local/bin/pool-engine-sim --model %m --port %p --probe-devices /dev/nvidia0,/dev/nvidia1 -ngl 99
		Port=8081
		StopTimeoutSec=5
		[Health]
		IntervalSec=2
		[Scope]
		MemoryMax=256M
	EOF
	cat >/etc/pool-managerd/pools.d/embed.pool <<-'EOF'
		[Pool]
		Description=Embeddings on GPU 1
		Devices=GPU-8f2c1a70-0000-4000-8000-000000000001
		Model=nomic-embed.gguf
		[Engine]
		ExecStart=/usr/local/bin/pool-engine-sim --model %m --port %p --probe-devices /dev/nvidia0,/dev/nvidia1
		Port=8082
		StopTimeoutSec=5
		[Health]
		IntervalSec=2
		[Restart]
		BreakerThreshold=3
		BreakerOpenSec=3600
		[Scope]
		MemoryMax=256M
		OOMPolicy=continue
	EOF
	want_ok "pool-managerd --check-config" pool-managerd --check-config || return 1
	# The inventory is a manager setting: it takes a restart.
	want_ok "systemctl restart pool-managerd" timeout 60 systemctl restart pool-managerd
	wait_for 120 "2/2 pools ready" '[ "$(systemctl show -p StatusText --value pool-managerd)" = "2/2 pools ready" ]'
}

# upgrade: the same package again, as an upgrade (dpkg runs postinst
# configure with the old version; rpm -U runs %post with 2 and the old
# package's %postun with 1).
upgrade() {
	case $KIND in
	deb) timeout 120 dpkg -i "$P/pool-managerd.deb" ;;
	rpm) timeout 120 rpm -Uvh --replacepkgs --nodeps "$P/pool-managerd.rpm" ;;
	esac
}

# nobody_poolctl ARGS...: poolctl as a user with no say, bounded.
nobody_poolctl() { timeout 20 setpriv --reuid=nobody --regid=nogroup --clear-groups poolctl "$@" 2>&1; }

# Run last before the removal, both pools ready, with fresh counters. The
# engines run on through every upgrade (each runs a daemon-reload, and
# restarts a running daemon) and through the daemon's stop and start:
# same pids, no crash.
c_upgrade() {
	local d0 e1 e2 c1 c2 out code t0 t1
	mcall ResetBreaker s llama8b >/dev/null 2>&1
	mcall ResetBreaker s embed >/dev/null 2>&1
	ready llama8b
	ready embed
	d0=$(systemctl show -p MainPID --value pool-managerd)
	e1=$(pv llama8b MainPID)
	e2=$(pv embed MainPID)
	c1=$(crashes llama8b)
	c2=$(crashes embed)
	want_ok "upgrade of a running daemon" upgrade
	want "running: still active" "$(systemctl is-active pool-managerd)" active
	want "running: still enabled" "$(systemctl is-enabled pool-managerd)" enabled
	[ "$(systemctl show -p MainPID --value pool-managerd)" != "$d0" ] || { echo "MISMATCH: the upgrade did not restart the running daemon"; fails=$((fails + 1)); }
	ready llama8b 120
	ready embed 120
	# Past the half second a pool holds an exit for systemd's word.
	sleep 2
	info "engines across the upgrade: llama8b pid $e1 -> $(pv llama8b MainPID), embed pid $e2 -> $(pv embed MainPID)"
	want "llama8b's engine outlives the upgrade (pid)" "$(pv llama8b MainPID)" "$e1"
	want "embed's engine outlives the upgrade (pid)" "$(pv embed MainPID)" "$e2"
	want "llama8b: no crash across the upgrade" "$(crashes llama8b)" "$c1"
	want "embed: no crash across the upgrade" "$(crashes embed)" "$c2"

	want_ok "systemctl disable --now pool-managerd" timeout 60 systemctl disable --now pool-managerd
	want_ok "upgrade of a disabled, stopped daemon" upgrade
	want "disabled: still inactive" "$(systemctl is-active pool-managerd)" inactive
	want "disabled: still disabled" "$(systemctl is-enabled pool-managerd)" disabled
	want "no bus activation" "$(busctl list --activatable --no-pager 2>&1 | grep -c "$B")" 0
	t0=$(date +%s%N)
	out=$(nobody_poolctl list)
	code=$?
	t1=$(date +%s%N)
	want "poolctl list as nobody while down: exit status" "$code" 1
	want_match "poolctl list as nobody while down" "$out" 'pool-managerd is not running \(systemctl start pool-managerd\)'
	want "poolctl list answers within 5 s" "$(((t1 - t0) / 1000000000 < 5))" 1
	info "poolctl list while down took $(((t1 - t0) / 1000000)) ms: $out"
	out=$(nobody_poolctl status llama8b)
	want_match "poolctl status as nobody while down" "$out" 'pool-managerd is not running'
	want "still inactive after the calls" "$(systemctl is-active pool-managerd)" inactive
	want "still disabled after the calls" "$(systemctl is-enabled pool-managerd)" disabled

	want_ok "systemctl enable --now pool-managerd" timeout 60 systemctl enable --now pool-managerd
	ready llama8b 120
	ready embed 120
	sleep 2
	want "llama8b's engine outlives the stopped daemon's upgrade (pid)" "$(pv llama8b MainPID)" "$e1"
	want "embed's engine outlives the stopped daemon's upgrade (pid)" "$(pv embed MainPID)" "$e2"
	want "llama8b: no crash across the stopped daemon's upgrade" "$(crashes llama8b)" "$c1"
	want "embed: no crash across the stopped daemon's upgrade" "$(crashes embed)" "$c2"
}

c_ready() {
	local pools
	pools=$(mcall ListPools)
	want_match "ListPools" "$pools" '"embed" "/org/llorch/PoolManager1/pool/embed"'
	want_match "ListPools" "$pools" '"llama8b" "/org/llorch/PoolManager1/pool/llama8b"'
	for p in llama8b embed; do
		want "$p Ready" "$(prop $p Ready)" "b true"
		want "$p State" "$(prop $p State)" 's "ready"'
		want "$p Live" "$(prop $p Live)" "b true"
		want "$p Unit" "$(pv $p Unit)" "pool-engine-$p.scope"
	done
	want "llama8b DeviceMask" "$(pv llama8b DeviceMask)" 0
	want "embed DeviceMask (as configured)" "$(pv embed DeviceMask)" GPU-8f2c1a70-0000-4000-8000-000000000001
}

c_poolctl() {
	local out code
	out=$(poolctl list 2>&1)
	want_match "poolctl list: llama8b" "$out" '^llama8b +ready +yes '
	want_match "poolctl list: embed" "$out" '^embed +ready +yes '
	out=$(setpriv --reuid=nobody --regid=nogroup --clear-groups poolctl status llama8b --json 2>&1)
	want_match "poolctl status as nobody" "$out" '"State": "ready"'
	out=$(setpriv --reuid=nobody --regid=nogroup --clear-groups poolctl stop embed 2>&1)
	code=$?
	want "poolctl stop as nobody: exit status" "$code" 1
	want_match "poolctl stop as nobody: refused" "$out" 'org.freedesktop.DBus.Error.AccessDenied'
	want "embed still ready" "$(pv embed Ready)" true
	want_ok "poolctl stop embed" poolctl stop embed
	want "embed State" "$(pv embed State)" stopped
	out=$(poolctl start embed 2>&1)
	want_match "poolctl start waits for Ready" "$out" '^start embed: ready in [0-9.]+m?s$'
	want "embed Ready" "$(pv embed Ready)" true
	for f in /usr/share/man/man1/poolctl.1.gz /usr/share/bash-completion/completions/poolctl \
		/usr/share/pool-managerd/pool-managerd.dashboard.json /usr/share/doc/pool-managerd/pool-managerd.rules.yml; do
		want_ok "$f installed" test -s "$f"
	done
}

# poolctl -H from the host: qemu forwards a port of the host's loopback to
# this guest's sshd on its user-mode NIC, which the host's throwaway key
# (remote.pub on the payload disk) opens for root and for an unprivileged
# user. The host watches this report for "REMOTE READY", runs its checks
# (their results are its own) and then touches /run/vm-check-remote.
c_remote() {
	install -d -m 0700 /root/.ssh
	install -m 0600 "$P/remote.pub" /root/.ssh/authorized_keys
	want_ok "useradd vmremote" useradd --create-home --shell /bin/sh vmremote
	install -d -m 0700 -o vmremote -g vmremote /home/vmremote/.ssh
	install -m 0600 -o vmremote -g vmremote "$P/remote.pub" /home/vmremote/.ssh/authorized_keys
	# qemu's user network: the guest is 10.0.2.15, the forward's target.
	mkdir -p /run/systemd/network
	printf '[Match]\nType=ether\n[Network]\nAddress=10.0.2.15/24\nLinkLocalAddressing=no\n' >/run/systemd/network/10-vmtest.network
	want_ok "systemctl start systemd-networkd" timeout 30 systemctl start systemd-networkd
	wait_for 30 "the NIC configured" "networkctl list --no-legend | grep -q ' configured'"
	want_ok "systemctl start ssh" timeout 30 systemctl start ssh || return 1
	info "$(networkctl list --no-legend | tr -s ' \n' ' '); openssh-server $(dpkg-query -W -f '${Version}' openssh-server 2>&1)"
	rm -f /run/vm-check-remote
	emit "REMOTE	READY"
	wait_for 150 "the host's poolctl -H checks (it touches /run/vm-check-remote)" '[ -e /run/vm-check-remote ]'
	want "llama8b Ready after the host's checks" "$(pv llama8b Ready)" true
	want "embed Ready after the host's checks" "$(pv embed Ready)" true
	want_ok "systemctl stop ssh" timeout 30 systemctl stop ssh
}

c_scope() {
	local s=pool-engine-llama8b.scope pid cg
	want "Slice" "$(systemctl show -p Slice --value $s)" pool-managerd-engines.slice
	want "DevicePolicy" "$(systemctl show -p DevicePolicy --value $s)" closed
	want "DeviceAllow" "$(systemctl show -p DeviceAllow --value $s | sort | paste -sd,)" "/dev/nvidia0 rw,/dev/nvidiactl rw"
	want "MemoryMax" "$(systemctl show -p MemoryMax --value $s)" 268435456
	cg=$(systemctl show -p ControlGroup --value $s)
	want "scope's memory.max" "$(cat /sys/fs/cgroup$cg/memory.max 2>&1)" 268435456
	pid=$(pv llama8b MainPID)
	want "engine's cgroup" "$(cat /proc/$pid/cgroup)" "0::$cg"
	local uid other
	uid=$(uid_of "$(pv llama8b MainPID)")
	other=$(uid_of "$(pv embed MainPID)")
	want_ok "engine's uid $uid: llama8b's own, from EngineUIDs=65536-99999" test "$uid" -ge 65536 -a "$uid" -le 99999
	want_ok "embed's uid $other: another" test "$uid" != "$other"
	want_match "llama8b's uid recorded" "$(tr -d ' \n' </var/lib/pool-managerd/engine-users.json)" "\"llama8b\":\\{\"uid\":$uid[,}]"
	want "engine's gid: its own too" "$(awk '/^Gid/ { print $2 }' /proc/$pid/status)" "$uid"
	want "engine's groups: pool-engine" "$(awk '/^Groups/ { print $2 }' /proc/$pid/status)" "$(getent group pool-engine | cut -d: -f3)"
	want_match "embed's engine cannot signal llama8b's" "$(setpriv --reuid="$other" --regid="$other" --clear-groups kill -0 "$pid" 2>&1)" 'Operation not permitted'
	want "engine's NoNewPrivs" "$(awk '/^NoNewPrivs/ { print $2 }' /proc/$pid/status)" 1
	want "CUDA_VISIBLE_DEVICES" "$(tr '\0' '\n' </proc/$pid/environ | grep ^CUDA_VISIBLE_DEVICES=)" CUDA_VISIBLE_DEVICES=GPU-8f2c1a70-0000-4000-8000-000000000000
	want "OOMPolicy (the engine scope's own, set by pool-managerd)" "$(systemctl show -p OOMPolicy --value $s)" stop
	info "$(systemctl show -p Slice,DevicePolicy,DeviceAllow,MemoryMax,OOMPolicy $s | tr '\n' ' ')"
	info "$(systemd-cgls --no-pager -u $s | tr -s ' \n' ' ')"
}

c_devices() {
	want "llama8b's /sim/devices" "$(curl -s --max-time 5 localhost:8081/sim/devices)" '{"/dev/nvidia0":"ENXIO","/dev/nvidia1":"EPERM"}'
	want "embed's /sim/devices" "$(curl -s --max-time 5 localhost:8082/sim/devices)" '{"/dev/nvidia0":"EPERM","/dev/nvidia1":"ENXIO"}'
	# On cgroup v2 the only device control is systemd's BPF program.
	want "no devices.list (v2)" "$(ls "/sys/fs/cgroup$(systemctl show -p ControlGroup --value pool-engine-llama8b.scope)/devices.list" 2>/dev/null)" ""
}

c_journal() {
	local lines
	lines=$(journalctl -u pool-engine-llama8b.scope -o cat --no-pager)
	want_match "engine output in the scope's journal" "$lines" 'server is listening on http://127.0.0.1:8081'
	want_match "attributed to the scope" "$(journalctl _SYSTEMD_UNIT=pool-engine-llama8b.scope -o cat --no-pager | tail -n 50)" 'GET /health'
}

c_lease() {
	local line id out
	out=$(mcall AcquireLease s llama8b 2>&1)
	want_match "AcquireLease" "$out" '^s "llama8b/'
	id=$(printf '%s' "$out" | sed -E 's/^s "(.*)"$/\1/')
	# busctl's connection has ended, and the lease with it.
	want "ActiveLeases after the caller left" "$(prop llama8b ActiveLeases)" "u 0"
	want_match "ReleaseLease of a gone lease" "$(dcall ReleaseLease "string:$id")" 'Error org\.llorch\.PoolManager1\.Error\.NoSuchLease'
}

c_drain() {
	local line dpid
	coproc ROUTER { exec timeout 120 "$P/router" llama8b 2>&1; }
	read -t 30 -r line <&"${ROUTER[0]}"
	want_match "router's lease" "$line" '^lease llama8b/'
	want "ActiveLeases" "$(prop llama8b ActiveLeases)" "u 1"
	mcall Drain st llama8b 30000 >/tmp/drain.out 2>&1 &
	dpid=$!
	wait_for 10 "Draining" '[ "$(pv llama8b Draining)" = true ]'
	want "Ready while draining" "$(prop llama8b Ready)" "b false"
	want_match "AcquireLease while draining" "$(dcall AcquireLease string:llama8b)" 'Error org\.llorch\.PoolManager1\.Error\.(Draining|NotReady)'
	sleep 1
	want "drain waits for the lease" "$(kill -0 $dpid 2>/dev/null && echo waiting)" waiting
	echo release >&"${ROUTER[1]}"
	read -t 30 -r line <&"${ROUTER[0]}"
	want "router's release" "$line" released
	wait_for 20 "the drain to finish" "! kill -0 $dpid 2>/dev/null"
	want "Drain outcome" "$(cat /tmp/drain.out)" 's "drained"'
	want "State" "$(prop llama8b State)" 's "stopped"'
	want "Live" "$(prop llama8b Live)" "b false"
	want "scope" "$(systemctl is-active pool-engine-llama8b.scope)" inactive
	eval "exec ${ROUTER[1]}>&-"
	wait "$ROUTER_PID" 2>/dev/null
	want_ok "Start" mcall Start s llama8b
	ready llama8b
}

c_reload() {
	local out
	want "Reload" "$(mcall Reload sst llama8b llama-3-8b-q5.gguf 30000 2>&1)" 's "llama-3-8b-q5.gguf"'
	want "Model" "$(pv llama8b Model)" llama-3-8b-q5.gguf
	want "ModelDigest" "$(pv llama8b ModelDigest)" "sha256:$(sha256sum "$MODELS/llama-3-8b-q5.gguf" | cut -d' ' -f1)"
	want "State" "$(pv llama8b State)" ready
	want_match "engine serves the new model" "$(curl -s --max-time 5 localhost:8081/v1/models)" '"id":"llama-3-8b-q5.gguf"'
	out=$(mcall Reload sst llama8b broken.gguf 30000 2>&1)
	want_match "Reload of a model the engine refuses" "$out" 'rolled back to llama-3-8b-q5\.gguf'
	ready llama8b
	want "Model after the rollback" "$(pv llama8b Model)" llama-3-8b-q5.gguf
}

c_oom() {
	local c0 pid0
	c0=$(crashes llama8b)
	pid0=$(pv llama8b MainPID)
	curl -s --max-time 5 -X POST 'localhost:8081/sim/fault?kind=oom' >/dev/null
	wait_for 60 "the crash" "[ \"\$(pv llama8b CrashCount)\" -gt $c0 ]"
	want "CrashCount" "$(crashes llama8b)" $((c0 + 1))
	want_match "LastError" "$(pv llama8b LastError)" '^out of memory'
	want_match "journal CRASH_REASON" "$(journalctl POOL_ID=llama8b CRASH_REASON=out_of_memory -o cat --no-pager)" .
	wait_for 20 "the metric" "grep -q 'pool_managerd_engine_crashes_total{pool_id=\"llama8b\",reason=\"out_of_memory\"} 1' $TEXTFILE"
	# What systemd itself says of the scope: pool-managerd sets
	# OOMPolicy=stop, so the whole scope goes, Result=oom-kill.
	want_match "systemd's Result for the scope" "$(journalctl _PID=1 UNIT=pool-engine-llama8b.scope -o cat --no-pager)" "Failed with result 'oom-kill'"
	info "LastError after the OOM kill: $(pv llama8b LastError)"
	info "systemd on the scope after the OOM kill: $(journalctl _PID=1 UNIT=pool-engine-llama8b.scope -o cat --no-pager | tail -n 4 | tr '\n' '|')"
	info "the kernel: $(journalctl -k -o cat --no-pager | grep -E 'Memory cgroup out of memory|oom-kill:' | tail -n 2 | cut -c1-200 | tr '\n' '|')"
	ready llama8b
	want_match "new engine" "$(pv llama8b MainPID)" "^[0-9]+$"
	[ "$(pv llama8b MainPID)" != "$pid0" ] || { echo "MISMATCH: MainPID unchanged"; fails=$((fails + 1)); }
}

# The other way systemd may be set up: OOMPolicy=continue leaves the scope
# (and the shim) running after the kernel's kill, so the shim's count of
# the scope's OOM kills (memory.events) is the witness.
c_oom_continue() {
	local c0
	c0=$(crashes embed)
	want "embed scope's OOMPolicy" "$(systemctl show -p OOMPolicy --value pool-engine-embed.scope)" continue
	curl -s --max-time 5 -X POST 'localhost:8082/sim/fault?kind=oom' >/dev/null
	wait_for 60 "the crash" "[ \"\$(pv embed CrashCount)\" -gt $c0 ]"
	want "CrashCount" "$(crashes embed)" $((c0 + 1))
	want_match "LastError" "$(pv embed LastError)" '^out of memory'
	want_match "journal CRASH_REASON" "$(journalctl POOL_ID=embed CRASH_REASON=out_of_memory -o cat --no-pager)" .
	info "LastError after the OOM kill (OOMPolicy=continue): $(pv embed LastError)"
	info "systemd on the scope (OOMPolicy=continue): $(journalctl _PID=1 UNIT=pool-engine-embed.scope -o cat --no-pager | tail -n 4 | tr '\n' '|')"
	ready embed
}

c_kill() {
	local c0 pid0
	c0=$(crashes llama8b)
	pid0=$(pv llama8b MainPID)
	want_ok "systemctl kill" timeout 30 systemctl kill --signal=SIGKILL pool-engine-llama8b.scope
	wait_for 30 "the crash" "[ \"\$(pv llama8b CrashCount)\" -gt $c0 ]"
	want_match "LastError" "$(pv llama8b LastError)" SIGKILL
	want_match "journal EXIT_SIGNAL" "$(journalctl POOL_ID=llama8b EXIT_SIGNAL=SIGKILL -o cat --no-pager)" .
	ready llama8b
	[ "$(pv llama8b MainPID)" != "$pid0" ] || { echo "MISMATCH: MainPID unchanged"; fails=$((fails + 1)); }
	want "CrashCount (counted once)" "$(crashes llama8b)" $((c0 + 1))
	info "LastError after systemctl kill: $(pv llama8b LastError)"
}

c_stop() {
	local c0
	c0=$(crashes llama8b)
	want_ok "systemctl stop" timeout 30 systemctl stop pool-engine-llama8b.scope
	wait_for 20 "State stopped" '[ "$(pv llama8b State)" = stopped ]'
	sleep 3 # longer than the backoff: no restart may come
	want "State" "$(pv llama8b State)" stopped
	want "CrashCount" "$(crashes llama8b)" "$c0"
	want "scope" "$(systemctl is-active pool-engine-llama8b.scope)" inactive
	want_match "LastError" "$(pv llama8b LastError)" 'systemctl stop'
	want_ok "Start" mcall Start s llama8b
	ready llama8b
}

c_adopt() {
	local p1 p2 d0 d1
	p1=$(pv llama8b MainPID)
	p2=$(pv embed MainPID)
	d0=$(systemctl show -p MainPID --value pool-managerd)
	local c1 c2
	c1=$(crashes llama8b)
	c2=$(crashes embed)
	want_ok "systemctl restart pool-managerd" timeout 60 systemctl restart pool-managerd
	if ! wait_for 60 "2/2 pools ready" '[ "$(systemctl show -p StatusText --value pool-managerd)" = "2/2 pools ready" ]'; then
		echo "StatusText: $(systemctl show -p StatusText --value pool-managerd); llama8b $(pv llama8b State), embed $(pv embed State)"
	fi
	d1=$(systemctl show -p MainPID --value pool-managerd)
	[ "$d0" != "$d1" ] || { echo "MISMATCH: the daemon was not restarted"; fails=$((fails + 1)); }
	want "llama8b MainPID" "$(pv llama8b MainPID)" "$p1"
	want "embed MainPID" "$(pv embed MainPID)" "$p2"
	want_ok "llama8b engine alive" kill -0 "$p1"
	want_ok "embed engine alive" kill -0 "$p2"
	want "llama8b CrashCount" "$(crashes llama8b)" "$c1"
	want "embed CrashCount" "$(crashes embed)" "$c2"
}

c_reload_refused() {
	local p1 out
	p1=$(pv llama8b MainPID)
	printf '[Pool]\nDevices=1\nModel=nomic-embed.gguf\nColour=blue\n' >/etc/pool-managerd/pools.d/broken.pool
	if out=$(timeout 120 systemctl reload pool-managerd 2>&1); then
		echo "MISMATCH: systemctl reload succeeded on a broken pool file: $out"
		fails=$((fails + 1))
	else
		echo "ok: systemctl reload failed: $out"
	fi
	want_match "ReloadConfig names file and line" "$(mcall ReloadConfig 2>&1)" 'broken\.pool:4: \[Pool\] Colour=: unknown key'
	want_match "the journal says why" "$(journalctl -u pool-managerd --no-pager -o cat -n 100)" 'broken\.pool:4'
	want "llama8b still Ready" "$(pv llama8b Ready)" true
	want "llama8b's engine the same" "$(pv llama8b MainPID)" "$p1"
	want_match "ListPools (no broken pool)" "$(mcall ListPools)" '^a\(so\) 2 '
	rm -f /etc/pool-managerd/pools.d/broken.pool
	want_ok "systemctl reload of the fixed configuration" timeout 120 systemctl reload pool-managerd
}

c_stop_kept() {
	want_ok "Stop" mcall Stop s llama8b
	want_ok "systemctl restart pool-managerd" timeout 60 systemctl restart pool-managerd
	wait_for 60 "pool-managerd active" '[ "$(systemctl is-active pool-managerd)" = active ]'
	ready embed
	sleep 3 # a start would be under way by now
	want "llama8b State after the restart" "$(pv llama8b State)" stopped
	want "no scope for llama8b" "$(systemctl is-active pool-engine-llama8b.scope)" inactive
	want_ok "Start" mcall Start s llama8b
	ready llama8b
}

c_disable() {
	local d=/etc/pool-managerd/pools.d/llama8b.pool.d
	want_ok "Disable llama8b" mcall Disable sb llama8b false
	want_match "the AutoStart= drop-in" "$(cat $d/50-AutoStart.conf 2>&1)" '^AutoStart=no$'
	want "its mode" "$(stat -c '%a %U' $d/50-AutoStart.conf 2>&1)" "644 root"
	want_match "the reloaded model's drop-in" "$(cat $d/50-Model.conf 2>&1)" '^Model=llama-3-8b-q5\.gguf$'
	want_match "--check-config lists the drop-ins" "$(pool-managerd --check-config 2>/dev/null)" "drop-in +$d/50-AutoStart\.conf"
	want "Disable does not stop it" "$(pv llama8b Ready)" true
}

c_breaker() {
	local c0
	c0=$(crashes embed)
	curl -s --max-time 5 -X POST 'localhost:8082/sim/fault?kind=segv' >/dev/null
	wait_for 30 "crash 2 of 3" "[ \"\$(pv embed CrashCount)\" -gt $c0 ]"
	ready embed
	want "BreakerState after 2 of 3" "$(pv embed BreakerState)" closed
	curl -s --max-time 5 -X POST 'localhost:8082/sim/fault?kind=segv' >/dev/null
	wait_for 30 "crash 3 of 3" "[ \"\$(pv embed CrashCount)\" -gt $((c0 + 1)) ]"
	wait_for 20 "embed failed" '[ "$(pv embed State)" = failed ]'
	want "BreakerState" "$(pv embed BreakerState)" open
	sleep 2
	want "State (no restart)" "$(pv embed State)" failed
	want "Live" "$(pv embed Live)" false
	want "llama8b unaffected" "$(pv llama8b Ready)" true
}

# An engine in a container: rootless podman run by the pool's User= inside
# the pool's scope (--cgroups=split in a delegated scope), with the drop-in
# the package ships. The image is the simulator's static binary alone,
# imported from a tarball: no registry is reachable from here.
PODHOME=/var/cache/pool-managerd/podsim
# A named system user of the pool's own: the image is put in its storage
# before the pool first starts.
PODUSER=podsim-engine
# upodman ARGS...: podman as the engine's user with the pool's HOME, in a
# service of its own, so that podman's pause process ends with it.
upodman() {
	systemd-run --wait --pipe --quiet -p User=$PODUSER -p WorkingDirectory=/ -E HOME=$PODHOME \
		podman --cgroup-manager=cgroupfs "$@" 2>/dev/null
}
# podsim_procs: conmon and the containers' processes, wherever they are.
podsim_procs() { pgrep -f '^/usr/bin/conmon |^/usr/bin/pool-engine-sim --model /models/' | sort -n; }

c_podman() {
	local t0 n
	want_ok "useradd $PODUSER" useradd --system --no-create-home --home-dir $PODHOME --groups pool-engine --shell /usr/sbin/nologin $PODUSER
	install -d -o $PODUSER -g $PODUSER -m 0700 $PODHOME $PODHOME/.config $PODHOME/.config/containers
	# overlay (native in the user namespace): vfs would copy the image at
	# every start, and its copy of a set-user-ID file is refused under the
	# daemon's RestrictSUIDSGID=.
	printf '[storage]\ndriver = "overlay"\n' >$PODHOME/.config/containers/storage.conf
	chown $PODUSER:$PODUSER $PODHOME/.config/containers/storage.conf
	t0=$(now)
	want_ok "podman import of the image tarball" timeout 120 systemd-run --wait --pipe --quiet -p User=$PODUSER -p WorkingDirectory=/ \
		-E HOME=$PODHOME podman --cgroup-manager=cgroupfs import --change 'ENTRYPOINT ["/usr/bin/pool-engine-sim"]' \
		"$P/pool-engine-sim.tar" localhost/pool-engine-sim || return 1
	info "podman import of the simulator's image: $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s; $(podman --version)"
	want "the import leaves no podman process" "$(pgrep -a podman | tr '\n' ' ')" ""
	want "storage driver" "$(upodman info --format '{{.Store.GraphDriverName}}')" overlay
	want_match "the image's set-user-ID file" "$(tar -tvf "$P/pool-engine-sim.tar" ./usr/bin/setuid-file)" '^-rwsr-xr-x'
	want_ok "the shipped drop-in" install -D -m 0644 /usr/share/doc/pool-managerd/examples/pool-managerd.service.d/podman.conf \
		/etc/systemd/system/pool-managerd.service.d/podman.conf
	echo 'c /dev/nvidia2 0666 root root - 195:2' >>/etc/tmpfiles.d/vm-fake-gpus.conf
	systemd-tmpfiles --create /etc/tmpfiles.d/vm-fake-gpus.conf
	echo 'Device=2 GPU-8f2c1a70-0000-4000-8000-000000000002 /dev/nvidia2' >>/etc/pool-managerd/pool-managerd.conf.d/gpus.conf
	printf 'GGUF\003\000\000\000 podsim' >"$MODELS/podsim.gguf"
	cat >/etc/pool-managerd/pools.d/podsim.pool <<-'EOF'
		[Pool]
		Description=The simulator in a container on GPU 2
		Devices=2
		Model=podsim.gguf
		[Engine]
		User=podsim-engine
		ExecStart=/usr/bin/podman --cgroup-manager=cgroupfs run --rm --cgroups=split --network=host --uts=host --name pool-%i --replace --volume %m:/models/model.gguf:ro localhost/pool-engine-sim --model /models/model.gguf --port %p
		Port=8083
		StopTimeoutSec=10
		[Health]
		IntervalSec=2
		StartTimeoutSec=120
		[Scope]
		Delegate=yes
		MemoryMax=256M
		OOMPolicy=continue
	EOF
	want_ok "pool-managerd --check-config" pool-managerd --check-config || return 1
	systemctl daemon-reload
	want_ok "systemctl restart pool-managerd" timeout 60 systemctl restart pool-managerd
	ready podsim 150
}

c_podman_scope() {
	local s=pool-engine-podsim.scope cg pid main n=0
	cg=$(systemctl show -p ControlGroup --value $s)
	want "podsim Unit" "$(pv podsim Unit)" $s
	want "podsim State" "$(pv podsim State)" ready
	main=$(pv podsim MainPID)
	want_match "the engine (podman run) in the scope" "$(cat /proc/$main/cgroup)" "^0::$cg/"
	want_match "conmon" "$(pgrep -a -f '^/usr/bin/conmon ')" conmon
	want_match "the server in the container" "$(pgrep -a -f '^/usr/bin/pool-engine-sim --model /models/')" pool-engine-sim
	for pid in $(podsim_procs); do
		want_match "$(tr '\0' ' ' </proc/$pid/cmdline | cut -c1-60)'s cgroup" "$(cat /proc/$pid/cgroup)" "^0::$cg/(runtime|libpod-payload-[0-9a-f]{64})$"
		n=$((n + 1))
	done
	want "conmon and the server" "$n" 2
	pid=$(pgrep -f '^/usr/bin/pool-engine-sim --model /models/')
	want_match "the server's cgroup" "$(cat /proc/$pid/cgroup)" "^0::$cg/libpod-payload-"
	want "the server's user" "$(ps -o user:20= -p "$pid")" $PODUSER
	want "the scope's owner (Delegate=yes)" "$(stat -c %U /sys/fs/cgroup$cg)" $PODUSER
	want_match "podman ps" "$(upodman ps --format '{{.Names}} {{.Status}}')" '^pool-podsim Up'
	info "$(systemd-cgls --no-pager -u $s | cut -c1-110 | tr -s ' \n' ' ')"
}

c_podman_kill() {
	local c0 pid0 main0
	c0=$(crashes podsim)
	main0=$(pv podsim MainPID)
	pid0=$(pgrep -f '^/usr/bin/pool-engine-sim --model /models/')
	want_ok "kill -KILL of the server in the container" kill -KILL "$pid0"
	wait_for 60 "the crash" "[ \"\$(pv podsim CrashCount)\" -gt $c0 ]"
	want "CrashCount (counted once)" "$(crashes podsim)" $((c0 + 1))
	info "LastError after a SIGKILL inside the container: $(pv podsim LastError)"
	ready podsim 120
	[ "$(pv podsim MainPID)" != "$main0" ] || { echo "MISMATCH: MainPID unchanged"; fails=$((fails + 1)); }
	want_match "a new server" "$(pgrep -f '^/usr/bin/pool-engine-sim --model /models/')" "^[0-9]+$"
	[ "$(pgrep -f '^/usr/bin/pool-engine-sim --model /models/')" != "$pid0" ] || { echo "MISMATCH: the same server"; fails=$((fails + 1)); }
	want "CrashCount" "$(crashes podsim)" $((c0 + 1))
}

# Under OOMPolicy=continue the shim's count of the scope's OOM kills is the
# witness: it must count a kill inside the container, beneath the scope,
# though podman moved the shim beneath it too.
c_podman_oom() {
	local c0
	c0=$(crashes podsim)
	curl -s --max-time 5 -X POST 'localhost:8083/sim/fault?kind=oom' >/dev/null
	wait_for 60 "the crash" "[ \"\$(pv podsim CrashCount)\" -gt $c0 ]"
	want "CrashCount" "$(crashes podsim)" $((c0 + 1))
	want_match "LastError" "$(pv podsim LastError)" '^out of memory'
	info "LastError after an OOM kill inside the container (OOMPolicy=continue): $(pv podsim LastError)"
	ready podsim 120
}

c_podman_stop() {
	local t0
	t0=$(now)
	want_ok "poolctl stop podsim" timeout 60 poolctl stop podsim
	want "State" "$(pv podsim State)" stopped
	# The pool is stopped once its engine (podman run) has ended; conmon's
	# cleanup may take the scope a moment longer.
	wait_for 30 "the scope gone" '[ "$(systemctl is-active pool-engine-podsim.scope)" = inactive ]'
	info "podman engine stopped, scope gone: $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s after poolctl stop"
	want "podman ps -a" "$(upodman ps -a --format '{{.Names}}')" ""
	want "conmon, the server, podman" "$(podsim_procs; pgrep -a podman)" ""
	# The rest of the walkthrough runs as the package ships.
	rm -f /etc/pool-managerd/pools.d/podsim.pool /etc/systemd/system/pool-managerd.service.d/podman.conf
	systemctl daemon-reload
	want_ok "systemctl reload pool-managerd" timeout 60 systemctl reload pool-managerd
	wait_for 30 "podsim gone from ListPools" '! mcall ListPools | grep -q podsim'
}

phase1() {
	info "boot 1 of the .$KIND: $(cat /proc/uptime | cut -d' ' -f1) s since the kernel started"
	wait_for 60 "the system up" "timeout 5 systemctl is-system-running --wait >/dev/null 2>&1 || systemctl is-system-running | grep -Eq 'running|degraded'" >/dev/null
	check "PID 1 is systemd on cgroup v2" c_host
	check "install (.$KIND)" c_install || return 1
	check "two simulator pools on fake GPUs" c_configure || return 1
	check "both pools Ready over the bus" c_ready
	check "poolctl: list, status as nobody, a refused stop, stop and start (waits for Ready); its man page, completion, dashboard, rules" c_poolctl
	check "engine scope: slice, DevicePolicy=closed, DeviceAllow, MemoryMax, user" c_scope
	check "DevicePolicy=closed enforced: own GPU ENXIO, other pool's EPERM" c_devices
	check "engine output in the scope's journal" c_journal
	check "a lease ends with its caller's connection" c_lease
	check "drain waits for a held lease, then Start" c_drain
	check "reload to a new model; a bad one rolled back" c_reload
	check "MemoryMax= OOM kill (systemd's OOMPolicy=stop) classified out_of_memory, restarted" c_oom
	check "OOM kill under OOMPolicy=continue classified out_of_memory (shim's witness)" c_oom_continue
	check "systemctl kill --signal=SIGKILL of the scope: a crash naming SIGKILL, restarted" c_kill
	check "systemctl stop of the scope: stopped, no crash, no restart" c_stop
	check "systemctl restart pool-managerd keeps the engines" c_adopt
	check "systemctl reload of a broken pool file fails; the old configuration serves" c_reload_refused
	check "Stop, then systemctl restart pool-managerd: still stopped" c_stop_kept
	check "breaker opens after BreakerThreshold crashes" c_breaker
	# Before Disable: the podman checks restart and reload the daemon, and
	# boot 2 checks the state Disable leaves (llama8b running, disabled).
	if [ "$KIND" = deb ]; then
		check "podman engine (rootless, --cgroups=split, the shipped drop-in): image imported from a tarball, Ready" c_podman &&
			check "podman engine: podman, conmon and the server inside the pool's scope" c_podman_scope &&
			check "podman engine: SIGKILL of the server inside the container is a crash, restarted" c_podman_kill &&
			check "podman engine: an OOM kill inside the container classified out_of_memory (shim's witness)" c_podman_oom
		check "podman engine: a stop leaves no container and no process" c_podman_stop
	fi
	check "Disable: a drop-in in /etc, the pool runs on" c_disable
	{
		echo "llama_crashes=$(crashes llama8b)"
		echo "embed_crashes=$(crashes embed)"
		echo "embed_breaker=$(pv embed BreakerState)"
		echo "llama_uid=$(uid_of "$(pv llama8b MainPID)")"
	} >"$STATE/phase1"
	sync
	emit "PHASE	1	DONE"
	return 100
}

# ---------------------------------------------------------------- boot 2

c_back() {
	. "$STATE/phase1"
	want "PID 1" "$(cat /proc/1/comm)" systemd
	want_ok "fake GPU nodes made at boot" test -c /dev/nvidia0 -a -c /dev/nvidia1
	wait_for 60 "pool-managerd active" '[ "$(systemctl is-active pool-managerd)" = active ]'
	ready llama8b 120
	want "llama8b CrashCount kept" "$(crashes llama8b)" "$llama_crashes"
	want "llama8b's engine runs as its uid of boot 1" "$(uid_of "$(pv llama8b MainPID)")" "$llama_uid"
	want_ok "llama8b's own GPU only" test "$(curl -s --max-time 5 localhost:8081/sim/devices)" = '{"/dev/nvidia0":"ENXIO","/dev/nvidia1":"EPERM"}'
}

c_disabled_kept() {
	wait_for 60 "pool-managerd active" '[ "$(systemctl is-active pool-managerd)" = active ]'
	wait_for 60 "STATUS= set" '[ -n "$(systemctl show -p StatusText --value pool-managerd)" ]'
	sleep 3 # a start would be under way by now
	want "llama8b State (disabled)" "$(pv llama8b State)" stopped
	want "no scope for llama8b" "$(systemctl is-active pool-engine-llama8b.scope)" inactive
	want "llama8b Model (the reloaded one)" "$(pv llama8b Model)" llama-3-8b-q5.gguf
	want_ok "Enable" mcall Enable sb llama8b false
	want_ok "Start" mcall Start s llama8b
	ready llama8b 120
	want_match "the engine serves the reloaded model" "$(curl -s --max-time 5 localhost:8081/v1/models)" '"id":"llama-3-8b-q5.gguf"'
}

c_breaker_kept() {
	. "$STATE/phase1"
	want "embed State" "$(pv embed State)" failed
	want "embed BreakerState" "$(pv embed BreakerState)" "$embed_breaker"
	want "embed CrashCount" "$(crashes embed)" "$embed_crashes"
	want "embed Live" "$(pv embed Live)" false
	want "no scope for embed" "$(systemctl is-active pool-engine-embed.scope)" inactive
	want_match "Start refused" "$(dcall Start string:embed)" 'Error org\.llorch\.PoolManager1\.Error\.BreakerOpen'
	want_ok "ResetBreaker" mcall ResetBreaker s embed
	ready embed
	want "BreakerState after ResetBreaker" "$(pv embed BreakerState)" closed
}

c_remove() {
	# What the package put on the host: its files and the directories of
	# its own name that hold them (outside /etc: the operator's files are
	# there, and a removal keeps them).
	local owned
	case $KIND in
	deb) owned=$(dpkg -L pool-managerd) ;;
	rpm) owned=$(rpm -ql pool-managerd) ;;
	esac
	owned=$(printf '%s\n' "$owned" | while read -r f; do
		echo "$f"
		d=$(dirname "$f")
		case $d in *pool-managerd*) echo "$d" ;; esac
	done | grep -E 'pool-managerd|PoolManager1' | grep -v '^/etc/' | sort -u)
	case $KIND in
	deb) want_ok "dpkg -r" timeout 180 dpkg -r pool-managerd ;;
	rpm) want_ok "rpm -e" timeout 180 rpm -e pool-managerd ;;
	esac
	no_engines_left
	# shellcheck disable=SC2086
	gone "package files and directories" $owned
	# A removal (not a purge) keeps the operator's configuration and the
	# persisted state; rpm removes a config file nobody changed.
	kept "operator's files" /etc/pool-managerd/pools.d/llama8b.pool /etc/pool-managerd/pools.d/embed.pool \
		/etc/pool-managerd/pool-managerd.conf.d/gpus.conf "$MODELS/llama-3-8b-q4.gguf"
	kept "persisted state" /var/lib/pool-managerd/pools
	case $KIND in
	deb) kept "conffile" /etc/pool-managerd/pool-managerd.conf ;;
	rpm) gone "unchanged %config" /etc/pool-managerd/pool-managerd.conf ;;
	esac
}

c_purge() {
	local out
	out=$(timeout 120 dpkg --purge pool-managerd 2>&1)
	want "dpkg --purge" "$?" 0
	info "dpkg --purge said: $(printf '%s' "$out" | tr '\n' '|')"
	want "dpkg -s" "$(dpkg -s pool-managerd >/dev/null 2>&1 && echo known)" ""
	no_engines_left
	gone "configuration, runtime and daemon's state" /etc/pool-managerd /run/pool-managerd \
		/var/lib/pool-managerd/pools /var/lib/pool-managerd/staged /var/lib/pool-managerd/digests.json "$TEXTFILE"
	# Never the operator's models: they and their directory stay.
	kept "operator's models" "$MODELS/llama-3-8b-q4.gguf" "$MODELS/llama-3-8b-q5.gguf" "$MODELS/nomic-embed.gguf" "$MODELS/broken.gguf"
	want "what else is left in /var/lib/pool-managerd" "$(find /var/lib/pool-managerd -mindepth 1 -not -path "$MODELS" -not -path "$MODELS/*" | tr '\n' ' ')" ""
}

phase2() {
	info "boot 2 of the .$KIND: $(cat /proc/uptime | cut -d' ' -f1) s since the kernel started"
	check "after a reboot: the disabled pool stays stopped; its reloaded model loads on Start" c_disabled_kept
	check "after a reboot: the pools come back, counters kept" c_back
	check "after a reboot: breaker state kept, ResetBreaker" c_breaker_kept
	if [ -f "$P/remote.pub" ]; then
		check "sshd up for the host's poolctl -H; the pools still Ready after it" c_remote
	fi
	check "upgrade: a running daemon is restarted and the engines run on; a disabled, stopped one stays so, and poolctl says so at once" c_upgrade
	case $KIND in
	deb)
		check "dpkg -r: no scope, no engine, operator's files kept" c_remove
		check "dpkg --purge: nothing of the package left, models kept" c_purge
		;;
	rpm)
		check "rpm -e: no scope, no engine, package files gone" c_remove
		;;
	esac
	emit "PHASE	2	DONE"
	return 0
}

if [ -f "$STATE/phase1" ]; then
	phase2
else
	phase1
fi
