#!/bin/bash
# The walkthrough on a real engine (make vm-test, the Debian sid guest): the
# .deb supervises Debian's own llama-server (llama.cpp-tools) serving tiny
# GGUF models made here with python3-gguf. No simulator runs in this guest.
# One boot; results go to the second serial port (lib.sh).
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

LS=/usr/bin/llama-server
# The engines' own ports.
PORT=8081 SLEEPY=8082 BIG=8083 FIG=8084 COLD=8085 SWAPA=8086 SWAPB=8087 DEBIAN=8090

# complete PORT N_PREDICT [PROMPT]: one real generation; prints the HTTP code.
complete() {
	curl -s -o /tmp/complete.$1 -w '%{http_code}' --max-time 300 -H 'Content-Type: application/json' \
		-d "{\"prompt\":\"${3:-hello world}\",\"n_predict\":$2,\"ignore_eos\":true}" "localhost:$1/completion"
}
# metric PORT NAME: one series of the engine's own /metrics.
metric() { curl -s --max-time 5 "localhost:$1/metrics" | awk -v n="$2" '$1 == n { print $2 }'; }
enginepid() { pv "$1" MainPID; }
# crashes_of POOL REASON...: the pool's crashes of those reasons, as the
# metrics textfile counts them (the journal's files may be mid-rotation).
crashes_of() {
	local pool=$1
	shift
	awk -v pool="$pool" -v reasons=" $* " '
		index($1, "pool_managerd_engine_crashes_total{pool_id=\"" pool "\",reason=\"") == 1 {
			r = $1; sub(/.*reason="/, "", r); sub(/".*/, "", r)
			if (index(reasons, " " r " ")) n += $2
		}
		END { print n + 0 }' "$TEXTFILE"
}
export TEXTFILE
export -f complete metric crashes_of

c_host() {
	want "PID 1" "$(cat /proc/1/comm)" systemd
	want "cgroup filesystem" "$(stat -fc %T /sys/fs/cgroup)" cgroup2fs
	want_match "llama-server --version" "$($LS --version 2>&1)" 'version: [0-9]'
	info "kernel $(uname -r); $(systemctl --version | head -n 1); $(grep PRETTY_NAME /etc/os-release); $($LS --version 2>&1 | grep version:)"
}

c_install() {
	want_ok "dpkg -i" timeout 120 dpkg -i "$P/pool-managerd.deb"
	want "pool-managerd.service" "$(systemctl is-active pool-managerd)" active
}

c_configure() {
	cat >/etc/tmpfiles.d/vm-fake-gpus.conf <<-'EOF'
		c /dev/nvidia0 0666 root root - 195:0
		c /dev/nvidia1 0666 root root - 195:1
		c /dev/nvidia2 0666 root root - 195:2
		c /dev/nvidia3 0666 root root - 195:3
		c /dev/nvidia4 0666 root root - 195:4
		c /dev/nvidia5 0666 root root - 195:5
		c /dev/nvidiactl 0666 root root - 195:255
	EOF
	want_ok "fake GPU nodes" systemd-tmpfiles --create /etc/tmpfiles.d/vm-fake-gpus.conf
	# Two tiny models (another seed, another digest), one that llama.cpp
	# refuses (the GGUF magic, then garbage), and a bigger one for memory.
	want_ok "tiny-a.gguf" python3 "$P/tiny-gguf.py" "$MODELS/tiny-a.gguf" --seed 1 --name tiny-a
	want_ok "tiny-b.gguf" python3 "$P/tiny-gguf.py" "$MODELS/tiny-b.gguf" --seed 2 --name tiny-b
	want_ok "big.gguf" python3 "$P/tiny-gguf.py" "$MODELS/big.gguf" --embd 512 --blocks 8 --seed 3 --name big
	{
		printf 'GGUF\003\000\000\000'
		head -c 4096 /dev/urandom
	} >"$MODELS/corrupt.gguf"
	chmod 0644 "$MODELS"/*.gguf
	info "models: $(ls -l "$MODELS" | awk 'NR > 1 { printf "%s %s; ", $9, $5 }')"
	cat >/etc/pool-managerd/pool-managerd.conf.d/gpus.conf <<-'EOF'
		[Inventory]
		Device=0 GPU-5d1e0c3a-0000-4000-8000-000000000000 /dev/nvidia0
		Device=1 GPU-5d1e0c3a-0000-4000-8000-000000000001 /dev/nvidia1
		Device=2 GPU-5d1e0c3a-0000-4000-8000-000000000002 /dev/nvidia2
		Device=3 GPU-5d1e0c3a-0000-4000-8000-000000000003 /dev/nvidia3
		Device=4 GPU-5d1e0c3a-0000-4000-8000-000000000004 /dev/nvidia4
		Device=5 GPU-5d1e0c3a-0000-4000-8000-000000000005 /dev/nvidia5
		ControlDevice=/dev/nvidiactl
	EOF
	cat >/etc/pool-managerd/pools.d/llama.pool <<-EOF
		[Pool]
		Description=Debian's llama-server on a tiny model
		Devices=0
		Model=tiny-a.gguf
		Slots=2
		[Engine]
		ExecStart=$LS -m %m --port %p --host 127.0.0.1 --metrics -c 8192 -np 1 -t 1
		Port=$PORT
		VersionCommand=$LS --version
		StopTimeoutSec=20
		[Health]
		IntervalSec=2
		TimeoutSec=2
		FailureThreshold=3
		StartTimeoutSec=120
		ProgressURL=http://127.0.0.1:%p/metrics
		StallSec=8
		WarmupRequest=POST /completion {"prompt":"hello world","n_predict":4}
		WarmupTimeoutSec=60
		[Restart]
		BackoffInitialSec=0.5
		BackoffMinSec=0.5
		BreakerThreshold=20
		StormMaxRestarts=40
	EOF
	cat >/etc/pool-managerd/pools.d/sleepy.pool <<-EOF
		[Pool]
		Description=llama-server that unloads its model when idle
		Devices=1
		Model=tiny-b.gguf
		[Engine]
		ExecStart=$LS -m %m --port %p --host 127.0.0.1 --metrics -c 256 -t 1 --sleep-idle-seconds 2 -v
		Port=$SLEEPY
		VersionCommand=$LS --version
		StopTimeoutSec=10
		[Health]
		IntervalSec=2
		TimeoutSec=2
		ProgressURL=http://127.0.0.1:%p/metrics
		StallSec=10
	EOF
	cat >/etc/pool-managerd/pools.d/big.pool <<-EOF
		[Pool]
		Description=llama-server with its model in anonymous memory
		Devices=2
		Model=big.gguf
		[Engine]
		ExecStart=$LS -m %m --port %p --host 127.0.0.1 -c 256 -t 1 --load-mode none
		Port=$BIG
		StopTimeoutSec=10
		[Health]
		IntervalSec=2
		TimeoutSec=2
		StartTimeoutSec=180
		[Scope]
		MemoryMax=1G
	EOF
	# The restart figure's pool: the same engine as Debian's unit runs,
	# a constant 100 ms backoff like its RestartSec=100ms.
	cat >/etc/pool-managerd/pools.d/fig.pool <<-EOF
		[Pool]
		Description=llama-server restarted like Debian's unit with Restart=always
		Devices=3
		Model=tiny-a.gguf
		[Engine]
		ExecStart=$LS -m %m --port %p --host 127.0.0.1 -c 8192 -np 1 -t 1
		Port=$FIG
		StopTimeoutSec=10
		[Health]
		IntervalSec=2
		TimeoutSec=2
		[Restart]
		BackoffInitialSec=0.1
		BackoffMinSec=0.1
		BackoffMaxSec=0.1
		JitterPercent=0
		BreakerThreshold=100
		StormMaxRestarts=100
	EOF
	want_ok "pool-managerd --check-config" pool-managerd --check-config || return 1
	want_ok "systemctl restart pool-managerd" timeout 60 systemctl restart pool-managerd
	wait_for 240 "4/4 pools ready" '[ "$(systemctl show -p StatusText --value pool-managerd)" = "4/4 pools ready" ]'
}

c_ready() {
	want "llama Ready (its real /health)" "$(pv llama Ready)" true
	want "llama State" "$(pv llama State)" ready
	want_match "the engine's /health" "$(curl -s --max-time 5 localhost:$PORT/health)" '"status":"ok"'
	want_match "EngineVersion from llama-server --version" "$(pv llama EngineVersion)" '0\.[0-9]+\.[0-9]+|version'
	# The warm-up went through the real POST /completion before Ready:
	# llama.cpp counts its tokens, and no other request was sent yet.
	local toks
	toks=$(metric $PORT llamacpp:tokens_predicted_total)
	want_match "tokens predicted by the warm-up" "${toks:-none}" '^[1-9]'
	want_match "the scope's journal: llama-server's own lines" "$(journalctl -u pool-engine-llama.scope -o cat --no-pager)" 'srv +[a-z_]+: '
	info "EngineVersion: $(pv llama EngineVersion) $(journalctl -u pool-managerd -o export --no-pager | grep -a -m 1 '^ERROR=.*version')"
	info "llama-server's first lines: $(journalctl -u pool-engine-llama.scope -o cat --no-pager | grep -m 3 -E ' [IWE] ' | tr '\n' '|' | cut -c1-300)"
}

# A generation longer than StallSec: n_decode_total moves while
# tokens_predicted_total waits for the request's end.
c_long() {
	local c0 pid0 code t0 took
	c0=$(crashes llama) pid0=$(enginepid llama)
	t0=$(date +%s)
	code=$(complete $PORT 1500)
	took=$(($(date +%s) - t0))
	want "long generation: HTTP status" "$code" 200
	info "a 1500-token generation took $took s (StallSec=8)"
	want "the generation outlasted StallSec" "$([ "$took" -gt 8 ] && echo yes)" yes
	want "CrashCount after the long generation" "$(crashes llama)" "$c0"
	want "same engine" "$(enginepid llama)" "$pid0"
	want "no stall counted" "$(crashes_of llama stalled)" 0
}

# An engine frozen mid-request: its probes fail, the daemon stops it; the
# stop ends in SIGKILL (a frozen process cannot exit), and the crash keeps
# the daemon's reason, with no shim said lost.
c_frozen() {
	local c0 pid cpid t0 h0
	t0=$(date +%s)
	c0=$(crashes llama) pid=$(enginepid llama) h0=$(crashes_of llama health_check stalled)
	complete $PORT 100000 >/dev/null &
	cpid=$!
	wait_for 20 "a request in flight" "[ \"\$(metric $PORT llamacpp:requests_processing)\" = 1 ]"
	kill -STOP "$pid"
	wait_for 90 "the crash" "[ \"\$(pv llama CrashCount)\" -gt $c0 ]"
	kill "$cpid" 2>/dev/null
	wait "$cpid" 2>/dev/null
	wait_for 30 "the crash counted as health_check or stalled" "[ \$(crashes_of llama health_check stalled) -gt $h0 ]"
	want_match "LastError" "$(pv llama LastError)" 'health|stall|progress'
	want "no shim said lost" "$(journalctl -u pool-managerd --since="@$t0" -o cat --no-pager | grep -ci 'shim lost')" 0
	want "counted once" "$(crashes llama)" $((c0 + 1))
	ready llama 120
	info "frozen engine: LastError: $(pv llama LastError)"
}

c_segv() {
	local c0 pid s0
	c0=$(crashes llama) pid=$(enginepid llama) s0=$(crashes_of llama signal core_dump)
	kill -SEGV "$pid"
	wait_for 60 "the crash" "[ \"\$(pv llama CrashCount)\" -gt $c0 ]"
	want_match "LastError names SIGSEGV" "$(pv llama LastError)" 'SIGSEGV'
	wait_for 30 "the crash counted as signal or core_dump" "[ \$(crashes_of llama signal core_dump) -gt $s0 ]"
	ready llama 120
}

c_reload() {
	local out
	want "Reload to tiny-b" "$(mcall Reload sst llama tiny-b.gguf 60000 2>&1)" 's "tiny-b.gguf"'
	want "Model" "$(pv llama Model)" tiny-b.gguf
	want "ModelDigest" "$(pv llama ModelDigest)" "sha256:$(sha256sum "$MODELS/tiny-b.gguf" | cut -d' ' -f1)"
	want_match "the engine serves tiny-b" "$(curl -s --max-time 5 localhost:$PORT/v1/models)" 'tiny-b'
	out=$(mcall Reload sst llama corrupt.gguf 60000 2>&1)
	want_match "Reload of a corrupt GGUF rolled back" "$out" 'rolled back to tiny-b\.gguf'
	ready llama 120
	want "Model after the rollback" "$(pv llama Model)" tiny-b.gguf
	want_match "llama.cpp's own words on the corrupt file" "$(journalctl -u pool-engine-llama.scope -o cat --no-pager | grep -i -m 1 -E 'gguf|failed to load')" .
	want "Reload back to tiny-a" "$(mcall Reload sst llama tiny-a.gguf 60000 2>&1)" 's "tiny-a.gguf"'
}

# A drain waits for the lease, then for the engine's own request in flight
# that holds no lease; the request completes, and the engine exits on its
# SIGTERM (no SIGKILL).
c_drain() {
	local line dpid cpid code t0
	t0=$(date +%s)
	coproc ROUTER { exec timeout 120 "$P/router" llama 2>&1; }
	read -t 30 -r line <&"${ROUTER[0]}"
	want_match "router's lease" "$line" '^lease llama/'
	(complete $PORT 1500 >/tmp/drain-request.code) &
	cpid=$!
	wait_for 20 "a request in flight (no lease)" "[ \"\$(metric $PORT llamacpp:requests_processing)\" = 1 ]"
	mcall Drain st llama 120000 >/tmp/drain.out 2>&1 &
	dpid=$!
	wait_for 10 "Draining" '[ "$(pv llama Draining)" = true ]'
	sleep 1
	want "drain waits for the lease" "$(kill -0 $dpid 2>/dev/null && echo waiting)" waiting
	echo release >&"${ROUTER[1]}"
	read -t 30 -r line <&"${ROUTER[0]}"
	want "router's release" "$line" released
	wait_for 150 "the drain to finish" "! kill -0 $dpid 2>/dev/null"
	wait "$cpid"
	want "the request in flight completed" "$(cat /tmp/drain-request.code)" 200
	want "Drain outcome" "$(cat /tmp/drain.out)" 's "drained"'
	want "State" "$(pv llama State)" stopped
	want "no SIGKILL" "$(journalctl _PID=1 UNIT=pool-engine-llama.scope --since="@$t0" -o cat --no-pager | grep -c 'SIGKILL')" 0
	eval "exec ${ROUTER[1]}>&-"
	wait "$ROUTER_PID" 2>/dev/null
	want_ok "Start" mcall Start s llama
	ready llama 120
}

c_oom() {
	local c0 s=pool-engine-big.scope
	c0=$(crashes big)
	info "big's engine: $(ps -o rss=,vsz= -p "$(enginepid big)") (RSS, VSZ in KiB)"
	# The model lives in anonymous memory (--load-mode none): a limit below
	# what it holds leaves the kernel nothing to reclaim.
	want_ok "MemoryMax=48M on the scope" systemctl set-property --runtime $s MemoryMax=48M
	wait_for 60 "the crash" "[ \"\$(pv big CrashCount)\" -gt $c0 ]"
	want_match "LastError" "$(pv big LastError)" '^out of memory'
	wait_for 30 "the crash counted as out_of_memory" "[ \$(crashes_of big out_of_memory) -gt 0 ]"
	ready big 180
}

c_adopt() {
	local pid0
	pid0=$(enginepid llama)
	want_ok "systemctl restart pool-managerd" timeout 60 systemctl restart pool-managerd
	wait_for 60 "llama Ready again" '[ "$(pv llama Ready)" = true ]'
	want "the same engine, adopted" "$(enginepid llama)" "$pid0"
	want "its scope" "$(systemctl is-active pool-engine-llama.scope)" active
}

# --sleep-idle-seconds unloads the model while /health stays 200; the next
# request wakes it. Never a restart.
c_sleepy() {
	local pid0 c0
	pid0=$(enginepid sleepy) c0=$(crashes sleepy)
	wait_for 60 "llama-server entering its sleep" "journalctl -u pool-engine-sleepy.scope -o cat --no-pager | grep -q 'entering sleeping state'"
	sleep 5
	want "Ready while the engine sleeps" "$(pv sleepy Ready)" true
	want "a request wakes it" "$(complete $SLEEPY 4)" 200
	sleep 4
	want "same engine" "$(enginepid sleepy)" "$pid0"
	want "CrashCount" "$(crashes sleepy)" "$c0"
}

# The output scanner on the real server's lines. Whoever can send a request
# can write lines into the engine's log: llama-server echoes a grammar it
# cannot parse line by line, unprefixed. One that quotes ggml's CUDA error
# (its three lines and the abort line) must not stop a healthy engine.
c_scanner() {
	local pid0 c0 code
	pid0=$(enginepid sleepy) c0=$(crashes sleepy)
	code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 30 -H 'Content-Type: application/json' \
		-d '{"prompt":"hi","n_predict":2,"grammar":"root ::= x\nCUDA error: an illegal memory access was encountered\n  current device: 0, in function ggml_backend_cuda_synchronize at ggml-cuda.cu:2503\n  cudaStreamSynchronize(cuda_ctx->stream())\nggml-cuda.cu:75: CUDA error\n"}' \
		"localhost:$SLEEPY/completion")
	want "the engine refuses the grammar" "$code" 400
	sleep 4
	want_match "the engine's log quotes the CUDA error" "$(journalctl -u pool-engine-sleepy.scope -o cat --no-pager | grep -c '^CUDA error: an illegal memory access')" '^[1-9]'
	want "same engine" "$(enginepid sleepy)" "$pid0"
	want "CrashCount" "$(crashes sleepy)" "$c0"
	want "Ready" "$(pv sleepy Ready)" true
	want "no cuda_error counted" "$(crashes_of sleepy cuda_error)" 0
	info "the verbose engine's lines: $(journalctl -u pool-engine-sleepy.scope -o cat --no-pager | grep -a -m 3 -E ' D (srv|slot|que) ' | tr '\n' '|' | cut -c1-300)"
}

# debian_model MODEL: the model, arguments and port of Debian's
# llama-server.service, read at its next start (/etc/default/llama-server);
# the same arguments as the figures' pools.
debian_model() {
	cat >/etc/default/llama-server <<-EOF
		LLAMA_ARG_MODEL=$MODELS/$1
		LLAMA_ARG_HOST=127.0.0.1
		LLAMA_ARG_PORT=$DEBIAN
		LLAMA_ARG_CTX_SIZE=8192
		LLAMA_ARG_N_PARALLEL=1
		LLAMA_ARG_THREADS=1
	EOF
}

# Time from a SIGKILL of llama-server until it answers /completion again,
# under pool-managerd and under Debian's own llama-server.service (from
# llama.cpp-services) with Restart=always and RestartSec=100ms, the same
# model and arguments, in turns.
c_figure() {
	local i t ours=() debs=() t0
	debian_model tiny-a.gguf
	mkdir -p /etc/systemd/system/llama-server.service.d
	printf '[Service]\nRestart=always\nRestartSec=100ms\n' >/etc/systemd/system/llama-server.service.d/restart.conf
	systemctl daemon-reload
	want_ok "Debian's llama-server.service" systemctl start llama-server.service
	wait_for 60 "Debian's unit answers" "[ \"\$(complete $DEBIAN 1)\" = 200 ]"
	wait_for 60 "fig answers" "[ \"\$(complete $FIG 1)\" = 200 ]"
	for i in 1 2 3 4 5; do
		t=$(back_after_kill $DEBIAN "$(systemctl show -p MainPID --value llama-server.service)")
		debs+=("$t")
		t0=$(date +%s.%N)
		t=$(back_after_kill $FIG "$(enginepid fig)")
		ours+=("$t")
	done
	systemctl stop llama-server.service
	info "SIGKILL to /completion again, pool-managerd: ${ours[*]} s; Debian's llama-server.service (Restart=always, RestartSec=100ms): ${debs[*]} s"
	info "medians: pool-managerd $(median "${ours[@]}") s, Debian's unit $(median "${debs[@]}") s, ratio $(awk -v a="$(median "${ours[@]}")" -v b="$(median "${debs[@]}")" 'BEGIN { printf "%.2f", a / b }')"
	# The parts of the last round of ours, from the kill: the daemon's
	# journal (crash, restart, engine started, ready) with its times.
	info "pool-managerd's last round, seconds after the kill: $(journalctl POOL_ID=fig --since="@${t0%.*}" -o short-unix --no-pager |
		awk -v t0="$t0" '{ ts = $1; $1 = ""; $2 = ""; sub(/^ +/, ""); printf "%.3f %s|", ts - t0, $0 }' | cut -c1-700)"
	want_match "every pool-managerd round came back" "${ours[*]}" '^[0-9. ]+$'
	want_match "every Debian round came back" "${debs[*]}" '^[0-9. ]+$'
}
# back_after_kill PORT PID: seconds from SIGKILL until /completion answers.
back_after_kill() {
	local t0
	t0=$(date +%s.%N)
	kill -KILL "$2"
	sleep 0.05
	timeout 120 bash -c "until [ \"\$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 -H 'Content-Type: application/json' -d '{\"prompt\":\"hi\",\"n_predict\":1}' localhost:$1/completion)\" = 200 ]; do sleep 0.02; done" || { echo timeout; return; }
	awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'
	sleep 2
}
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# healthy PORT: the engine on PORT answers GET /health with 200. Bash's own
# /dev/tcp: no fork, so a clock can look every few milliseconds.
healthy() {
	local line=
	{ printf 'GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' >&9 && read -r -t 2 line <&9; } 2>/dev/null 9<>"/dev/tcp/127.0.0.1/$1"
	[[ $line == "HTTP/1."?" 200 "* ]]
}
# clock MODE PORT COMMAND...: sets took to the seconds from COMMAND's start
# until it has succeeded and, MODE "until", the engine on PORT answers
# /health with 200 (looked at every 5 ms); MODE "then": one look once
# COMMAND is done must find it 200 (the lease or EnsureReady answered with
# the engine serving). took is "failed: why" otherwise. Nothing is forked
# but COMMAND; its output is in /tmp/clock.out, its start in clock_t0.
clock() {
	local mode=$1 port=$2 rc t1
	shift 2
	[ -p /tmp/clock.fifo ] || { rm -f /tmp/clock.fifo; mkfifo /tmp/clock.fifo; }
	exec 8<>/tmp/clock.fifo
	clock_t0=$EPOCHREALTIME
	"$@" >/tmp/clock.out 2>&1
	rc=$?
	if [ $rc != 0 ]; then
		took="failed: $1 exited $rc: $(head -c 200 /tmp/clock.out)"
		return 1
	fi
	if [ "$mode" = until ]; then
		# a 5 ms wait on a FIFO nobody writes: sleep(1) would fork
		until healthy "$port"; do
			if ((${EPOCHREALTIME%.*} - ${clock_t0%.*} > 180)); then
				took="failed: no /health 200 within 180 s"
				return 1
			fi
			read -r -t 0.005 -u 8
		done
	fi
	t1=$EPOCHREALTIME
	if [ "$mode" = then ] && ! healthy "$port"; then
		took="failed: /health on port $port not 200 once $1 answered"
		return 1
	fi
	took=$(awk -v a="$clock_t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
}
# states POOL: its State, Live and Ready on one line, from one busctl.
states() { busctl --timeout=10 get-property "$B" "$OBJ/pool/$1" "$B.Pool" State Live Ready 2>&1 | awk '{ gsub(/"/, "", $2); printf "%s%s", sep, $2; sep = " " }'; }
export -f states
# idle_gone POOL: waits until the pool is idle with its engine and scope gone.
idle_gone() {
	wait_for 60 "$1 idle, its engine gone" "[ \"\$(states $1)\" = 'idle false false' ] && ! systemctl -q is-active pool-engine-$1.scope"
}
# figures WHAT OURS REFERENCE: medians, ratio and overhead of two series of seconds.
figures() {
	local a b
	if ! [[ "$2 $3" =~ ^[0-9.\ ]+$ ]]; then
		info "$1: no medians: a round failed"
		return
	fi
	a=$(median $2) b=$(median $3)
	info "$1: medians: pool-managerd $a s, Debian's unit $b s, ratio $(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.2f", a / b }'); overhead (ours less the reference) $(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.0f", (a - b) * 1000 }') ms against the goal < 30 ms (information only: a software-emulated guest)"
}
# journal_since T0 POOL...: the daemon's entries about the pools from T0,
# in seconds after it, on one line.
journal_since() {
	local t0=$1 p m=()
	shift
	for p in "$@"; do m+=("POOL_ID=$p"); done
	journalctl "${m[@]}" --since="@${t0%.*}" -o short-unix --no-pager |
		awk -v t0="$t0" '{ ts = $1; $1 = ""; $2 = ""; sub(/^ +/, ""); if (ts >= t0) printf "%.3f %s|", ts - t0, $0 }' | cut -c1-700
}

# Rounds of each figure of pools on demand, ours and the reference in
# turns: each round starts two engines, seconds each in this guest.
ROUNDS=3

# Pools on demand, added by a configuration reload: one that goes idle a
# second after its last use and starts on a lease, and two of one group
# that take turns on GPU 5, each on its own model. The engine's arguments
# are those of Debian's unit in the figures below.
c_ondemand() {
	local m port
	cat >/etc/pool-managerd/pools.d/cold.pool <<-EOF
		[Pool]
		Description=llama-server stopped when unused, started on a lease
		Devices=4
		Model=tiny-a.gguf
		IdleStopSec=1
		StartOnLease=yes
		[Engine]
		ExecStart=$LS -m %m --port %p --host 127.0.0.1 -c 8192 -np 1 -t 1
		Port=$COLD
		StopTimeoutSec=10
		[Health]
		IntervalSec=2
		TimeoutSec=2
	EOF
	for m in a b; do
		port=$SWAPA
		[ $m = a ] || port=$SWAPB
		cat >/etc/pool-managerd/pools.d/swap$m.pool <<-EOF
			[Pool]
			Description=llama-server on tiny-$m, taking turns on GPU 5
			Devices=5
			Group=gpu5
			Model=tiny-$m.gguf
			[Engine]
			ExecStart=$LS -m %m --port %p --host 127.0.0.1 -c 8192 -np 1 -t 1
			Port=$port
			StopTimeoutSec=10
			[Health]
			IntervalSec=2
			TimeoutSec=2
		EOF
	done
	want_ok "systemctl reload pool-managerd" timeout 120 systemctl reload pool-managerd || return 1
	idle_gone cold
	want_match "cold's idle stop journaled" "$(journalctl POOL_ID=cold REASON=idle -o cat --no-pager)" 'pool idle: engine stopped'
	want_ok "EnsureReady swapa" mcall EnsureReady st swapa 120000
	want "swapa State Live Ready" "$(states swapa)" "ready true true"
	idle_gone swapb
}

# The cold start on a lease on the real engine: AcquireLease of the idle
# pool until it answers with the lease, the engine serving; against
# Debian's llama-server.service started until its /health answers, same
# model and arguments, in turns.
c_cold() {
	local i ours=() debs=() t0
	debian_model tiny-a.gguf
	systemctl stop llama-server.service
	for ((i = 1; i <= ROUNDS; i++)); do
		idle_gone cold || break
		clock then $COLD busctl --timeout=120 call "$B" "$OBJ" "$B.Manager" AcquireLease s cold
		ours+=("$took") t0=$clock_t0
		want_match "round $i: AcquireLease answered with an engine serving" "$took" '^[0-9.]+$'
		want_match "round $i: the lease" "$(</tmp/clock.out)" '^s "cold/'
		# The lease went with busctl's connection: the pool goes idle
		# again before the reference starts.
		idle_gone cold || break
		clock until $DEBIAN systemctl start llama-server.service
		debs+=("$took")
		want_match "round $i: Debian's unit answered" "$took" '^[0-9.]+$'
		systemctl stop llama-server.service
	done
	info "cold start on a lease (AcquireLease of an idle pool to its answer), pool-managerd: ${ours[*]} s; Debian's llama-server.service (systemctl start to /health 200): ${debs[*]} s"
	figures "cold start on a lease" "${ours[*]}" "${debs[*]}"
	info "pool-managerd's last cold start, seconds after the AcquireLease: $(journal_since "$t0" cold)"
	want "rounds" "${#ours[@]} ${#debs[@]}" "$ROUNDS $ROUNDS"
	want "cold CrashCount" "$(crashes cold)" 0
	want "idle stops journaled (REASON=idle)" "$(journalctl POOL_ID=cold REASON=idle -o cat --no-pager | grep -c 'pool idle: engine stopped')" $((ROUNDS + 1))
}

# parks: the group's pools parked so far, as the journal says.
parks() { journalctl REASON=group -o cat --no-pager | grep -c 'pool parked: its GPUs go'; }
export -f parks

# A group swap on the real engine: EnsureReady of the parked pool until it
# answers (the awake one drained, parked, its engine stopped; the parked
# one started and healthy), each swap the other way; against Debian's
# llama-server.service restarted on the other model until its /health
# answers (the stop of one engine and the start of another), in turns.
c_swap() {
	local i ours=() debs=() awake parked port m n0 t0
	debian_model tiny-a.gguf
	want_ok "Debian's llama-server.service" systemctl start llama-server.service
	n0=$(parks)
	for ((i = 1; i <= ROUNDS; i++)); do
		awake=swapa parked=swapb port=$SWAPB m=b
		if [ $((i % 2)) = 0 ]; then
			awake=swapb parked=swapa port=$SWAPA m=a
		fi
		want "round $i: $awake State Live Ready" "$(states $awake)" "ready true true"
		idle_gone $parked || break
		clock then $port busctl --timeout=120 call "$B" "$OBJ" "$B.Manager" EnsureReady st $parked 120000
		ours+=("$took") t0=$clock_t0
		want_match "round $i: EnsureReady $parked answered with its engine serving" "$took" '^[0-9.]+$'
		want "round $i: $parked State Live Ready" "$(states $parked)" "ready true true"
		want_match "round $i: $parked serves tiny-$m" "$(curl -s --max-time 5 localhost:$port/v1/models)" "tiny-$m"
		want "round $i: $awake State Live Ready" "$(states $awake)" "idle false false"
		want "round $i: $awake's scope" "$(systemctl is-active pool-engine-$awake.scope)" inactive
		debian_model tiny-$m.gguf
		clock until $DEBIAN systemctl restart llama-server.service
		debs+=("$took")
		want_match "round $i: Debian's unit answered" "$took" '^[0-9.]+$'
		want_match "round $i: Debian's unit serves tiny-$m" "$(curl -s --max-time 5 localhost:$DEBIAN/v1/models)" "tiny-$m"
	done
	systemctl stop llama-server.service
	info "group swap (EnsureReady of the parked pool to its answer), pool-managerd: ${ours[*]} s; Debian's llama-server.service (systemctl restart on the other model to /health 200): ${debs[*]} s"
	figures "group swap" "${ours[*]}" "${debs[*]}"
	info "the daemon's own swap times (park to answer, journal's DURATION_SEC): $(journalctl GROUP=gpu5 -o verbose --no-pager | awk -F= '/^ *DURATION_SEC=/ { printf "%.3f ", $2 }')s"
	info "pool-managerd's last swap, seconds after the EnsureReady: $(journal_since "$t0" swapa swapb)"
	want "rounds" "${#ours[@]} ${#debs[@]}" "$ROUNDS $ROUNDS"
	wait_for 10 "each swap parked the awake pool (REASON=group)" "[ \$(parks) -eq $((n0 + ROUNDS)) ]"
	want "crashes" "$(crashes swapa) $(crashes swapb)" "0 0"
}

c_purge() {
	local out
	out=$(timeout 120 dpkg --purge pool-managerd 2>&1)
	want "dpkg --purge" "$?" 0
	no_engines_left 'llama-server|pool-managerd-shim'
	gone "configuration, runtime and daemon's state" /etc/pool-managerd /run/pool-managerd \
		/var/lib/pool-managerd/pools /var/lib/pool-managerd/staged "$TEXTFILE"
	kept "operator's models" "$MODELS/tiny-a.gguf" "$MODELS/tiny-b.gguf"
}

info "sid guest: $(cut -d' ' -f1 /proc/uptime) s since the kernel started"
check "sid host: systemd PID 1, cgroup v2, Debian's llama-server" c_host || true
check "dpkg -i on sid" c_install || true
if ! check "four llama-server pools on tiny GGUF models" c_configure; then
	emit "PHASE	1	DONE"
	exit 1
fi
check "Ready on the real /health, warm-up through POST /completion, EngineVersion" c_ready
check "a long generation is never called stalled" c_long
check "an engine frozen mid-request: health_check, no shim lost" c_frozen
check "SIGSEGV named and restarted" c_segv
check "reload between two real models; a corrupt GGUF rolled back" c_reload
check "drain waits for a lease and for a request in flight without one" c_drain
check "MemoryMax= OOM kill with --load-mode none: out_of_memory" c_oom
check "systemctl restart pool-managerd adopts the real engine" c_adopt
check "--sleep-idle-seconds: the engine sleeps and wakes, never restarted" c_sleepy
check "a request that makes the engine quote a CUDA error is not a fault" c_scanner
check "figure: SIGKILL to /completion, pool-managerd against Debian's llama-server.service" c_figure
if check "pools on demand added by a reload: one idle, a group of two with one up" c_ondemand; then
	check "figure: cold start on a lease, pool-managerd against Debian's llama-server.service started" c_cold
	check "figure: group swap by EnsureReady, against Debian's llama-server.service restarted on the other model" c_swap
fi
check "dpkg --purge: nothing of the package left, models kept" c_purge
emit "PHASE	1	DONE"
exit 0
