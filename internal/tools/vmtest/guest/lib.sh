# What both walkthroughs share (sourced by check.sh and check-sid.sh): the
# report on the second serial port, the bus helpers, bounded waits and the
# check runner.
#   RESULT <TAB> PASS|FAIL <TAB> seconds <TAB> name
#   DETAIL <TAB> text      (why a check failed)
#   INFO <TAB> text        (what the host reported, for the record)
set -u
export LC_ALL=C
P=/run/vm-payload
KIND=$(cat "$P/kind")
STATE=/var/lib/vm-check
export B=org.llorch.PoolManager1
export OBJ=/org/llorch/PoolManager1
MODELS=/var/lib/pool-managerd/models
TEXTFILE=/var/lib/prometheus/node-exporter/pool-managerd.prom
exec 3>/dev/ttyS1
mkdir -p "$STATE"

emit() { printf '%s\n' "$*" >&3; }
info() { emit "INFO	$*"; }

# prop POOL NAME: a pool property as busctl prints it ("b true", "u 1").
prop() { busctl --timeout=10 get-property "$B" "$OBJ/pool/$1" "$B.Pool" "$2" 2>&1; }
# pv POOL NAME: the bare value.
pv() { prop "$1" "$2" | sed -E 's/^[a-z]+ //; s/^"(.*)"$/\1/'; }
mcall() { busctl --timeout=120 call "$B" "$OBJ" "$B.Manager" "$@"; }
# dcall METHOD ARGS...: dbus-send, which names the D-Bus error of a refusal.
dcall() { dbus-send --system --print-reply --reply-timeout=120000 --dest="$B" "$OBJ" "$B.Manager.$1" "${@:2}" 2>&1; }
export -f prop pv mcall dcall

fails=0
# want WHAT GOT WANTED
want() {
	if [ "$2" = "$3" ]; then
		echo "ok: $1 = $2"
	else
		echo "MISMATCH: $1: got '$2', want '$3'"
		fails=$((fails + 1))
	fi
}
# want_match WHAT GOT REGEX
want_match() {
	if printf '%s' "$2" | grep -Eq -- "$3"; then
		echo "ok: $1 ~ $3"
	else
		echo "MISMATCH: $1: got '$2', want a match of /$3/"
		fails=$((fails + 1))
	fi
}
# want_ok WHAT COMMAND...: the command succeeds (its status is returned).
want_ok() {
	local what=$1 out
	shift
	if out=$("$@" 2>&1); then
		echo "ok: $what"
	else
		echo "MISMATCH: $what: $* failed: $out"
		fails=$((fails + 1))
		return 1
	fi
}
# wait_for SECONDS WHAT SHELL-CONDITION
wait_for() {
	if timeout "$1" bash -c "until $3; do sleep 0.25; done"; then
		echo "ok: $2"
		return 0
	fi
	echo "MISMATCH: timed out after $1 s waiting for $2"
	fails=$((fails + 1))
	return 1
}

now() { date +%s.%N; }
# check NAME FUNCTION: runs it, reports PASS or FAIL with its duration.
check() {
	local name=$1 t0 t1 rc
	shift
	fails=0
	t0=$(now)
	"$@" >/tmp/check.out 2>&1
	rc=$?
	t1=$(now)
	[ "$fails" -eq 0 ] || rc=1
	local dt
	dt=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
	if [ "$rc" -eq 0 ]; then
		emit "RESULT	PASS	$dt	$name"
	else
		emit "RESULT	FAIL	$dt	$name"
		sed 's/^/DETAIL	/' /tmp/check.out >&3
		emit "DETAIL	--- journal of pool-managerd (last 15 lines)"
		journalctl -u pool-managerd -n 15 --no-pager -o short-monotonic 2>&1 | sed 's/^/DETAIL	/' >&3
	fi
	return "$rc"
}

# ready POOL [SECONDS]: waits for Ready; on a time-out says where the pool
# is and why, from its properties and the daemon's entries about it.
ready() {
	wait_for "${2:-60}" "$1 Ready" "[ \"\$(pv $1 Ready)\" = true ]" && return 0
	echo "  $1: State=$(pv "$1" State) LastError=$(pv "$1" LastError)"
	journalctl -u pool-managerd -o verbose --no-pager -n 12 POOL_ID="$1" | grep -E '^ +(MESSAGE|ERROR)=' | cut -c1-300 | sed 's/^ */  /'
	return 1
}
crashes() { pv "$1" CrashCount; }

# gone WHAT PATH...: none of the paths exists.
gone() {
	local what=$1 p left=
	shift
	for p in "$@"; do [ -e "$p" ] && left="$left $p"; done
	want "$what gone" "${left# }" ""
}
# kept WHAT PATH...: every path exists.
kept() {
	local what=$1 p missing=
	shift
	for p in "$@"; do [ -e "$p" ] || missing="$missing $p"; done
	want "$what kept" "${missing# }" ""
}

# no_engines_left [PATTERN]: no engine scope, engine or shim process (PATTERN,
# for pgrep -f, names them), daemon, runtime record or bus name is left.
no_engines_left() {
	local procs=${1:-pool-engine-sim|pool-managerd-shim}
	want "pool-engine scopes" "$(systemctl list-units --all --plain --no-legend 'pool-engine-*' | awk '{ print $1 }' | tr '\n' ' ')" ""
	want "engine and shim processes" "$(pgrep -a -f "$procs" | tr '\n' ' ')" ""
	want "daemon process" "$(pgrep -a -x pool-managerd | tr '\n' ' ')" ""
	want "pool-managerd.service" "$(systemctl is-active pool-managerd)" inactive
	want "runtime records" "$(ls /run/pool-managerd/pools/ 2>/dev/null | tr '\n' ' ')" ""
	if busctl --timeout=5 status "$B" >/dev/null 2>&1; then
		echo "MISMATCH: $B still on the bus"
		fails=$((fails + 1))
	fi
}

# uid_of PID: the process's real uid.
uid_of() {
	awk '/^Uid/ { print $2 }' "/proc/$1/status"
}
