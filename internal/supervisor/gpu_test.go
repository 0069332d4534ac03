package supervisor_test

import (
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/lifecycle"
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
