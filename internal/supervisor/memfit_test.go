//go:build linux && cgo

package supervisor_test

import (
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh100"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/gpu"
	"github.com/llorch/pool-managerd/internal/gpu/nvmlmock"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// Another pool's engine holds most of the GPU's memory (NVML says so):
// the start is refused with ErrNoGPUMemory naming that pool, no crash is
// counted, the failure streak stays, and once the memory is free the
// pool starts by itself.
func TestAStartWithoutGPUMemoryWaitsForItByName(t *testing.T) {
	sandbox.Need(t)
	host := nvmlmock.New(dgxh100.New())
	memory := supervisor.GPUMemory([]gpu.GPU{{UUID: host.GPU(0).UUID}}, gpu.NewNVMLWith(host.Server))

	e := testpool.New(t, nil)
	small := e.Start(testpool.Spec{ID: "small", Devices: "1"})
	smallPID := waitFor(t, small, "small ready", ready(1)).MainPID
	require.NotZero(t, smallPID)
	host.RunComputeMemory(0, nil, smallPID, 60<<30)

	// Holders is asked only while a scope is made (the precheck).
	var reads, scopes atomic.Int32
	big := e.Start(testpool.Spec{ID: "big", Devices: "0", NoStart: true, MemoryRetry: 300 * time.Millisecond,
		Memory: func() ([]gpu.DeviceMemory, error) {
			reads.Add(1)
			return memory()
		},
		Holders: func() ([]supervisor.GPUHolder, error) {
			scopes.Add(1)
			return nil, nil
		},
		Extra: "[Pool]\nMemoryRequired=30G\n"})
	err := big.Start()
	require.ErrorIs(t, err, lifecycle.ErrNoGPUMemory)
	want := "GPU " + host.GPU(0).UUID + " has 20G free of 80G, used by pool small (pid " + strconv.Itoa(smallPID)
	assert.Contains(t, err.Error(), want)
	assert.Contains(t, err.Error(), ", 60G)")
	s := big.Snapshot()
	assert.Equal(t, lifecycle.Failed, s.State)
	assert.Contains(t, s.LastError, want)
	assert.Zero(t, s.Policy.CrashCount, "no crash of ours")
	assert.Zero(t, s.Policy.Streak, "the failure streak is untouched")
	assert.Equal(t, "closed", s.Policy.Breaker.String())
	assert.False(t, s.Live)

	// It looks again and again without counting anything, and without
	// making a scope for each look.
	time.Sleep(time.Second)
	assert.GreaterOrEqual(t, reads.Load(), int32(3), "the memory is read at each retry")
	assert.Equal(t, int32(1), scopes.Load(), "a retry refused for memory makes no scope")
	s = big.Snapshot()
	assert.False(t, s.Live, "no engine started (a look may be under way: starting)")
	assert.Zero(t, s.Policy.CrashCount)
	assert.Zero(t, s.Policy.Streak)
	assert.Zero(t, s.Starts)

	host.StopCompute(0, smallPID)
	got := waitFor(t, big, "ready once the memory is free", ready(1))
	assert.Equal(t, int32(2), scopes.Load(), "the start that fits makes its scope")
	assert.Zero(t, got.Policy.CrashCount)
	assert.Zero(t, got.Policy.Streak)
}
