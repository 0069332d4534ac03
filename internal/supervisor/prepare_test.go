package supervisor_test

import (
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/lifecycle"
	. "github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

func scopeProp(unit, prop string) string {
	out, _ := exec.Command("systemctl", "show", "-p", prop, "--value", unit).Output()
	return strings.TrimSpace(string(out))
}

// preparedDuringBackoff crashes the pool's engine and waits, in the
// backoff, for the next engine's scope: it returns the scope's
// InvocationID and the pool's snapshot then.
func preparedDuringBackoff(t *testing.T, s *testpool.Pool) (string, Snapshot) {
	t.Helper()
	first := waitFor(t, s, "ready", ready(1))
	oldInv := scopeProp(first.Unit, "InvocationID")
	require.NoError(t, s.Fault("exit:1"))
	waitFor(t, s, "backoff", func(p Snapshot) bool { return p.State == lifecycle.Backoff })
	deadline := time.Now().Add(10 * time.Second)
	for {
		snap := s.Snapshot()
		require.Equal(t, lifecycle.Backoff, snap.State, "the scope is made during the backoff")
		inv := scopeProp(first.Unit, "InvocationID")
		if scopeProp(first.Unit, "ActiveState") == "active" && inv != "" && inv != oldInv {
			assert.Zero(t, snap.MainPID, "no engine runs in it yet")
			assert.Equal(t, 1, snap.Starts)
			return inv, snap
		}
		require.True(t, time.Now().Before(deadline), "no scope was prepared during the backoff")
		time.Sleep(10 * time.Millisecond)
	}
}

// A restart's scope is made during its backoff (Ahead before it is due),
// and the restarted engine runs in that very scope when the backoff ends,
// not before.
func TestARestartRunsInTheScopePreparedDuringItsBackoff(t *testing.T) {
	e := testpool.New(t, nil)
	s := e.Pool("ahead", "0", "", "BackoffInitialSec=1\nBackoffMinSec=1\n")
	inv, during := preparedDuringBackoff(t, s)
	assert.WithinDuration(t, during.NextRestart, time.Now(), 4*Ahead+100*time.Millisecond, "made at most 4 Ahead before the restart")
	again := waitFor(t, s, "ready again", ready(2))
	assert.Equal(t, inv, scopeProp(again.Unit, "InvocationID"), "the engine runs in the prepared scope")
	assert.False(t, again.ReadyAt.Before(during.NextRestart), "the engine started when its backoff ended")
}

// An operator's systemctl stop of the prepared scope stops the pool, as a
// stop of a running engine's does: no restart until Start.
func TestSystemctlStopOfAPreparedScopeStopsThePool(t *testing.T) {
	e := testpool.New(t, nil)
	s := e.Pool("ahead-stop", "0", "", "BackoffInitialSec=1\nBackoffMinSec=1\n")
	_, during := preparedDuringBackoff(t, s)
	out, err := exec.Command("systemctl", "stop", during.Unit).CombinedOutput()
	require.NoError(t, err, "%s", out)
	stopped := waitFor(t, s, "stopped", func(p Snapshot) bool { return p.State == lifecycle.Stopped })
	assert.Contains(t, stopped.LastError, "stopped by an operator")
	assert.Equal(t, uint64(1), stopped.Policy.CrashCount, "the crash before it, and nothing more")
	ctx, cancel := context.WithDeadline(e.Ctx, during.NextRestart.Add(500*time.Millisecond))
	defer cancel()
	_, err = s.Supervisor.Wait(ctx, func(p Snapshot) bool { return p.Starts > 1 })
	assert.ErrorIs(t, err, context.DeadlineExceeded, "not restarted")
	require.NoError(t, s.Start())
	waitFor(t, s, "ready after Start", ready(2))
}

// A scope killed while it waits is made again by the restart itself; a
// drain in the backoff gives the prepared scope up.
func TestAPreparedScopeKilledOrDrained(t *testing.T) {
	e := testpool.New(t, nil)
	killed := e.Pool("ahead-kill", "0", "", "BackoffInitialSec=1\nBackoffMinSec=1\n")
	inv, during := preparedDuringBackoff(t, killed)
	out, err := exec.Command("systemctl", "kill", "--signal=SIGKILL", during.Unit).CombinedOutput()
	require.NoError(t, err, "%s", out)
	again := waitFor(t, killed, "ready again", ready(2))
	assert.NotEqual(t, inv, scopeProp(again.Unit, "InvocationID"), "a scope of its own")
	assert.Equal(t, uint64(1), again.Policy.CrashCount, "the scope's kill is no crash of an engine")

	drained := e.Pool("ahead-drain", "1", "", "BackoffInitialSec=1\nBackoffMinSec=1\n")
	_, during = preparedDuringBackoff(t, drained)
	res, err := drained.Drain(e.Ctx, time.Minute)
	require.NoError(t, err)
	assert.Equal(t, lifecycle.Drained, res.Outcome)
	require.Eventually(t, func() bool { return scopeProp(during.Unit, "ActiveState") != "active" }, 10*time.Second, 20*time.Millisecond,
		"the prepared scope is given up")
	ctx, cancel := context.WithDeadline(e.Ctx, during.NextRestart.Add(500*time.Millisecond))
	defer cancel()
	_, err = drained.Supervisor.Wait(ctx, func(p Snapshot) bool { return p.Starts > 1 })
	assert.ErrorIs(t, err, context.DeadlineExceeded, "no restart after the drain")
}
