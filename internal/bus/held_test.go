package bus_test

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	api "github.com/llorch/pool-managerd/dbus"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
)

// failingPool configures the daemon with one pool, id, whose engine exits
// with status 1 300 ms after it listens, every time, under the given
// [Restart] settings, and starts the daemon. Its id starts with a digit,
// which its object path escapes.
func failingPool(t *testing.T, id, restart string) {
	t.Helper()
	dir, port := configure(t)
	require.NoError(t, os.Remove(filepath.Join(dir, "pools.d", "llama-8b.pool")))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", id+".pool"), []byte(fmt.Sprintf(`[Pool]
Devices=0
Model=a.gguf
[Engine]
ExecStart=%s --model %%m --port %%p --fault exit:1 --fault-after 300ms
Port=%d
StopTimeoutSec=2
Version=sim-1
[Health]
IntervalSec=0.2
TimeoutSec=0.2
[Restart]
BackoffInitialSec=0.2
BackoffMinSec=0.1
JitterPercent=0
%s`, os.Getenv(sandbox.BinEnv("pool-engine-sim")), port, restart)), 0o644))
	start(t, dir)
	t.Cleanup(func() { try("systemctl", "stop", "pool-engine-"+id+".scope") })
	out, err := call("ListPools")
	require.NoError(t, err, out)
	require.Equal(t, byte('7'), id[0])
	assert.Equal(t, fmt.Sprintf(`a(so) 1 "%s" "/org/llorch/PoolManager1/pool/_37%s"`, id, id[1:]), out,
		"a leading digit is escaped, as sd_bus_path_encode does")
}

// propLog records every value of the pool's properties announced with
// PropertiesChanged.
type propLog struct {
	mu   sync.Mutex
	seen map[string][]any
}

func watchPool(t *testing.T, pool string) *propLog {
	t.Helper()
	conn, err := dbus.ConnectSystemBus()
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	require.NoError(t, conn.AddMatchSignal(dbus.WithMatchObjectPath(api.PoolPath(pool)),
		dbus.WithMatchInterface("org.freedesktop.DBus.Properties"), dbus.WithMatchMember("PropertiesChanged")))
	sigs := make(chan *dbus.Signal, 256)
	conn.Signal(sigs)
	l := &propLog{seen: map[string][]any{}}
	go func() {
		for s := range sigs {
			if len(s.Body) < 2 {
				continue
			}
			changed, _ := s.Body[1].(map[string]dbus.Variant)
			l.mu.Lock()
			for k, v := range changed {
				l.seen[k] = append(l.seen[k], v.Value())
			}
			l.mu.Unlock()
		}
	}()
	return l
}

func (l *propLog) values(name string) []any {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]any(nil), l.seen[name]...)
}

// held waits until the pool is failed with its breaker open and its
// counters at crashes, restarts and streak, and checks that it stays held.
func held(t *testing.T, pool string, crashes, restarts, streak int) {
	t.Helper()
	waitProp(t, pool, "CrashCount", fmt.Sprintf("u %d", crashes))
	waitProp(t, pool, "State", `s "failed"`)
	// Several backoff delays pass: nothing restarts it.
	time.Sleep(1500 * time.Millisecond)
	for name, want := range map[string]string{
		"State": `s "failed"`, "BreakerState": `s "open"`, "Live": "b false", "MainPID": "u 0",
		"CrashCount": fmt.Sprintf("u %d", crashes), "RestartCount": fmt.Sprintf("u %d", restarts),
		"FailureStreak": fmt.Sprintf("u %d", streak),
	} {
		assert.Equal(t, want, getProp(t, pool, name), name)
	}
	assert.NotEqual(t, "t 0", getProp(t, pool, "NextRestartUSec"), "it says when the hold lifts")
	assert.Contains(t, getProp(t, pool, "LastError"), "exited with status 1", "every crash is the engine's own")
}

// daemonJournal returns the entries the running daemon wrote with the
// given MESSAGE_ID.
func daemonJournal(t *testing.T, id journal.MessageID) []map[string]any {
	t.Helper()
	inv := sh(t, "systemctl", "show", "-p", "InvocationID", "--value", "pool-managerd.service")
	var out []map[string]any
	for _, line := range strings.Split(sh(t, "journalctl", "_SYSTEMD_INVOCATION_ID="+inv, "MESSAGE_ID="+string(id), "-o", "json", "--no-pager"), "\n") {
		var e map[string]any
		if json.Unmarshal([]byte(line), &e) == nil {
			out = append(out, e)
		}
	}
	return out
}

// A pool whose engine keeps failing until its breaker opens: AllowRestart
// lets exactly one restart through without resetting a counter, and the
// breaker stays open; ResetBreaker closes it and the pool restarts, with
// the backoff's streak started over and the crash count kept.
func TestOverridesOfAPoolHeldByItsBreaker(t *testing.T) {
	const pool = "7bheld"
	failingPool(t, pool, "BreakerThreshold=2\n")
	held(t, pool, 2, 1, 2)

	// The opening says what kind of failure it is and what to do.
	var opened []map[string]any
	for _, e := range daemonJournal(t, journal.MsgBreakerChanged) {
		if e[journal.NewState] == "open" {
			opened = append(opened, e)
		}
	}
	require.Len(t, opened, 1)
	assert.Equal(t, "process", opened[0][journal.BreakerClass])
	assert.Equal(t, "process_storm", opened[0][journal.StormKind])
	assert.Contains(t, opened[0][journal.Hint], "journalctl -u pool-engine-")

	w := watchPool(t, pool)
	out, err := call("AllowRestart", "s", pool)
	require.NoError(t, err, out)
	held(t, pool, 3, 2, 3)
	assert.Len(t, w.values("RestartCount"), 1, "exactly one restart: %v", w.values("RestartCount"))
	assert.NotContains(t, w.values("BreakerState"), "closed", "AllowRestart leaves the breaker open")

	out, err = call("ResetBreaker", "s", pool)
	require.NoError(t, err, out)
	// The held restart happens at once; the engine still fails, so two
	// more crashes open the breaker again.
	held(t, pool, 5, 4, 2)
	assert.Contains(t, w.values("BreakerState"), "closed", "ResetBreaker closed the breaker")
	assert.Contains(t, w.values("FailureStreak"), uint32(0), "ResetBreaker started the streak over")

	var streaks []string
	for _, e := range daemonJournal(t, journal.MsgRestartScheduled) {
		if s, ok := e[journal.FailureStreak].(string); ok {
			streaks = append(streaks, s)
		}
	}
	assert.Equal(t, []string{"1", "1"}, streaks, "each scheduled restart names its place in the streak")
}

// A pool held by the restart storm limit (which opens the breaker of the
// storm's class): AllowRestart lets one restart through, past the limit;
// ResetBreaker lets the held restart through too, and the storm, which
// goes on, holds the pool again.
func TestOverridesOfAPoolHeldByTheStormLimit(t *testing.T) {
	const pool = "7bstorm"
	failingPool(t, pool, "BreakerThreshold=100\nStormMaxRestarts=2\nStormWindowSec=600\n")
	held(t, pool, 3, 2, 3)
	storms := daemonJournal(t, journal.MsgStorm)
	require.Len(t, storms, 1)
	assert.Equal(t, "process_storm", storms[0][journal.StormKind])

	w := watchPool(t, pool)
	out, err := call("AllowRestart", "s", pool)
	require.NoError(t, err, out)
	held(t, pool, 4, 3, 4)
	assert.Len(t, w.values("RestartCount"), 1, "exactly one restart: %v", w.values("RestartCount"))

	out, err = call("ResetBreaker", "s", pool)
	require.NoError(t, err, out)
	held(t, pool, 5, 4, 1)
	assert.Contains(t, w.values("BreakerState"), "closed", "ResetBreaker closed the breaker")
	assert.Len(t, daemonJournal(t, journal.MsgStorm), 3, "the storm was caught each time it went on")
}
