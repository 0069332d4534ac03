package supervisor_test

import (
	"os/exec"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/lifecycle"
	. "github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// Another process on the pool's GPU: the start says who holds it and is
// no crash; once the GPU is free, the pool starts by itself.
func TestAForeignProcessOnThePoolsGPUHoldsTheStart(t *testing.T) {
	sandbox.Need(t)
	holder := sandbox.HoldNode(t, "/dev/nvidia0")

	e := testpool.New(t, nil)
	p := e.Start(testpool.Spec{ID: "held", Devices: "0", NoStart: true, GPURetry: 500 * time.Millisecond})
	err := p.Start()
	require.ErrorIs(t, err, lifecycle.ErrGPUBusy)
	pid := strconv.Itoa(holder.Process.Pid)
	assert.Contains(t, err.Error(), "pid "+pid)
	s := p.Snapshot()
	assert.Equal(t, lifecycle.Failed, s.State)
	assert.Contains(t, s.LastError, "pid "+pid+" (supervisor.test")
	assert.Zero(t, s.Policy.CrashCount, "another process on the GPU is no crash of ours")
	assert.False(t, s.Live)

	require.NoError(t, holder.Process.Kill())
	holder.Wait()
	got := waitFor(t, p, "ready once the GPU is free", ready(1))
	assert.Zero(t, got.Policy.CrashCount)
}

// A leftover of the pool's own scope on its GPU is killed and waited for
// before the engine starts.
func TestALeftoverOfThePoolsOwnScopeIsKilledBeforeTheStart(t *testing.T) {
	sandbox.Need(t)
	leftover := exec.Command("sleep", "60")
	require.NoError(t, leftover.Start())
	gone := make(chan struct{})
	go func() { leftover.Wait(); close(gone) }()
	t.Cleanup(func() { leftover.Process.Kill(); <-gone })
	calls := 0
	e := testpool.New(t, nil)
	p := e.Start(testpool.Spec{ID: "own", Devices: "0", NoStart: true, Holders: func() ([]GPUHolder, error) {
		calls++
		select {
		case <-gone:
			return nil, nil
		default:
		}
		return []GPUHolder{{GPU: "GPU-8f2c1a70-0000-4000-8000-000000000000", PID: leftover.Process.Pid, Command: "sleep", Unit: "pool-engine-own.scope"}}, nil
	}})
	require.NoError(t, p.Start())
	select {
	case <-gone:
	case <-time.After(time.Second):
		t.Fatal("the leftover still runs after the start")
	}
	assert.Equal(t, 1, calls)
	waitFor(t, p, "ready", ready(1))
}
