package main

import (
	"encoding/json"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/lifecycle"
)

// An idle or sleeping pool reads as such since when, and how long ago; a
// pool in another state, or idle without a time, reads as its state.
func TestIdleStateSaysSinceWhenAndHowLongAgo(t *testing.T) {
	now := time.Date(2026, 12, 7, 16, 30, 0, 0, time.UTC)
	since := now.Add(-(5*time.Minute + 3*time.Second + 400*time.Millisecond))
	idle := map[string]dbus.Variant{"State": dbus.MakeVariant("idle"), "IdleSinceUSec": dbus.MakeVariant(uint64(since.UnixMicro()))}
	assert.Equal(t, "idle (5min 3s)", idleFor(idle, now, false))
	assert.Equal(t, "idle since "+since.Local().Format("Mon 2006-01-02 15:04:05 MST")+" (5min 3s ago)", idleFor(idle, now, true))
	// A clock behind the daemon's is no negative span.
	assert.Equal(t, "idle (0s)", idleFor(idle, since.Add(-time.Second), false))
	asleep := map[string]dbus.Variant{"State": dbus.MakeVariant("sleeping"), "IdleSinceUSec": dbus.MakeVariant(uint64(since.UnixMicro()))}
	assert.Equal(t, "sleeping (5min 3s)", idleFor(asleep, now, false))
	assert.Equal(t, "sleeping since "+since.Local().Format("Mon 2006-01-02 15:04:05 MST")+" (5min 3s ago)", idleFor(asleep, now, true))
	ready := map[string]dbus.Variant{"State": dbus.MakeVariant("ready"), "IdleSinceUSec": dbus.MakeVariant(uint64(0))}
	assert.Equal(t, "ready", idleFor(ready, now, true))
	noTime := map[string]dbus.Variant{"State": dbus.MakeVariant("idle")}
	assert.Equal(t, "idle", idleFor(noTime, now, true))
}

// ensure-ready takes the daemon's bound on its wait, and no more.
func TestEnsureReadyTimeoutIsTheDaemonsBound(t *testing.T) {
	assert.Equal(t, lifecycle.MaxWakeTimeout, maxEnsureWait)
	c, name, pos, err := parsed(t, "ensure-ready", "--timeout", "1h", "llama")
	require.NoError(t, err)
	assert.Equal(t, "ensure-ready", name)
	assert.Equal(t, []string{"llama"}, pos)
	assert.Equal(t, time.Hour, c.timeout)
	for _, c := range []struct {
		args []string
		msg  string
	}{
		{[]string{"ensure-ready", "llama", "--timeout", "1h 1s"}, "ensure-ready: --timeout 1h 1s is more than the daemon waits for a start (1h)"},
		{[]string{"ensure-ready", "llama", "--deadline", "5s"}, "ensure-ready takes no option --deadline"},
		{[]string{"ensure-ready"}, "ensure-ready takes POOL, got 0 argument(s)"},
	} {
		_, _, _, err := parsed(t, c.args...)
		var ue usageError
		require.ErrorAs(t, err, &ue, "%q", c.args)
		assert.Contains(t, ue.msg, c.msg, "%q", c.args)
	}
}

// A pool stopped for want of use: wait --for idle returns, list and status
// say since when, ensure-ready brings it back (or fails with NotReady when
// its wait is too short), for admins only.
func TestIdlePoolInListStatusWaitAndEnsureReady(t *testing.T) {
	daemonWith(t, "IdleStopSec=1\n")
	r := poolctl(t, "", "wait", "llama-8b", "--for", "idle", "--timeout", "30s")
	require.Equal(t, 0, r.code, r.stderr)
	r = poolctl(t, "", "wait", "qwen", "--for", "idle", "--timeout", "1")
	assert.Equal(t, result{"", "poolctl: pool qwen is ready, not idle, after 1s\n", 1}, r, "a pool without IdleStopSec= stays up")

	r = poolctl(t, "", "list")
	require.Equal(t, 0, r.code, r.stderr)
	lines := strings.Split(r.stdout, "\n")
	require.GreaterOrEqual(t, len(lines), 3, r.stdout)
	assert.Regexp(t, `^llama-8b +idle \([0-9]+s\) +no +0/2 +a\.gguf `, lines[1])
	assert.Regexp(t, `^qwen +ready +yes `, lines[2])
	t.Logf("poolctl list:\n%s", r.stdout)

	r = poolctl(t, "", "status", "llama-8b")
	require.Equal(t, 0, r.code, r.stderr)
	since := `idle since [A-Z][a-z]{2} [0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2} \S+ \([0-9]+s ago\)`
	assert.Regexp(t, `^● llama-8b - `+since+"\n", r.stdout)
	assert.Regexp(t, `\n +State: `+since+"\n", r.stdout)
	assert.Regexp(t, `\n +IdleSinceUSec: [A-Z][a-z]{2} [0-9-]+ [0-9:]+ \S+; [0-9]+s ago\n`, r.stdout)
	r = poolctl(t, "", "show", "llama-8b", "-p", "IdleSinceUSec", "--value")
	require.Equal(t, 0, r.code, r.stderr)
	usec, err := strconv.ParseInt(strings.TrimSpace(r.stdout), 10, 64)
	require.NoError(t, err, r.stdout)
	assert.WithinDuration(t, time.Now(), time.UnixMicro(usec), time.Minute)

	// Checked like every change: usage, access, an unknown pool.
	r = poolctl(t, "", "ensure-ready", "llama-8b", "--timeout", "2h")
	assert.Equal(t, 2, r.code)
	assert.Contains(t, r.stderr, "ensure-ready: --timeout 2h is more than the daemon waits for a start (1h)")
	r = poolctl(t, viewer, "ensure-ready", "llama-8b")
	assert.Equal(t, 1, r.code)
	assert.Contains(t, r.stderr, "AccessDenied")
	assert.Equal(t, `s "idle"`, prop("llama-8b", "State"), "a refused caller starts nothing")
	r = poolctl(t, "", "ensure-ready", "nosuch")
	assert.Equal(t, 4, r.code, r.stderr)

	// A wait shorter than the start: NotReady, and the start goes on.
	r = poolctl(t, "", "ensure-ready", "llama-8b", "--timeout", "1ms")
	assert.Equal(t, 1, r.code, r.stdout)
	assert.Contains(t, r.stderr, "NotReady")
	assert.Contains(t, r.stderr, "not ready within its wait")
	r = poolctl(t, "", "wait", "llama-8b", "--for", "idle", "--timeout", "60s")
	require.Equal(t, 0, r.code, r.stderr)

	r = poolctl(t, "", "ensure-ready", "llama-8b", "--timeout", "60s", "--json")
	require.Equal(t, 0, r.code, r.stderr)
	var out map[string]any
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &out), r.stdout)
	assert.Equal(t, "ready", out["outcome"])
	assert.Equal(t, "ensure-ready", out["command"])
	assert.Equal(t, "llama-8b", out["pool"])
	assert.Equal(t, "u 0", prop("llama-8b", "CrashCount"))

	// A ready pool answers at once.
	r = poolctl(t, "", "ensure-ready", "qwen")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Regexp(t, `^ensure-ready qwen: ready in [0-9.]+m?s\n$`, r.stdout)
}
