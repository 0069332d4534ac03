package supervisor_test

import (
	"context"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/crash"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	. "github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// An operator's systemctl stop of an engine's scope is honoured the way
// systemd honours it: stopped, not restarted, no crash; Start brings it
// back.
func TestOperatorStopOfTheScopeIsHonoured(t *testing.T) {
	e := testpool.New(t, nil)
	s := e.Pool("opstop", "0", "", "")
	first := waitFor(t, s, "ready", ready(1))
	out, err := exec.Command("systemctl", "stop", first.Unit).CombinedOutput()
	require.NoError(t, err, "%s", out)

	stopped := waitFor(t, s, "stopped", func(p Snapshot) bool { return p.State == lifecycle.Stopped && !p.Live })
	assert.Zero(t, stopped.Policy.CrashCount, "an operator's stop is no crash")
	assert.Contains(t, stopped.LastError, "stopped by an operator")
	ctx, cancel := context.WithTimeout(e.Ctx, 2*time.Second)
	defer cancel()
	_, err = s.Supervisor.Wait(ctx, func(p Snapshot) bool { return p.Starts > 1 })
	assert.ErrorIs(t, err, context.DeadlineExceeded, "not restarted")
	assert.Equal(t, syscall.ESRCH, syscall.Kill(first.MainPID, 0))

	require.NoError(t, s.Start())
	again := waitFor(t, s, "ready again", ready(2))
	assert.Zero(t, again.Policy.CrashCount)
}

// systemctl kill of the whole scope takes the shim too: systemd's word and
// the shim's end name it a crash by SIGKILL, counted once, and the pool
// restarts.
func TestSystemctlKillOfTheScopeIsACrashNamingTheSignal(t *testing.T) {
	e := testpool.New(t, nil)
	s := e.Pool("sckill", "0", "", "")
	first := waitFor(t, s, "ready", ready(1))
	out, err := exec.Command("systemctl", "kill", "--signal=SIGKILL", first.Unit).CombinedOutput()
	require.NoError(t, err, "%s", out)

	crashed := waitFor(t, s, "the crash", func(p Snapshot) bool { return p.Policy.CrashCount == 1 })
	assert.Equal(t, crash.Signal, crashed.LastReason)
	assert.Contains(t, crashed.LastError, "SIGKILL")
	again := waitFor(t, s, "ready again", ready(2))
	assert.Equal(t, uint64(1), again.Policy.CrashCount, "counted once")
	assert.NotEqual(t, first.MainPID, again.MainPID)
}
