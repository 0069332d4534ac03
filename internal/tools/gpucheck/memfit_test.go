package main

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/gpu"
)

func TestParseSMIMemory(t *testing.T) {
	total, free, err := parseSMIMemory("81559, 80989\n")
	require.NoError(t, err)
	assert.Equal(t, uint64(81559)<<20, total)
	assert.Equal(t, uint64(80989)<<20, free)
	for _, bad := range []string{"", "81559", "81559, [N/A]", "No devices were found", "-1, 5"} {
		_, _, err := parseSMIMemory(bad)
		assert.ErrorContains(t, err, "nvidia-smi's memory is not \"total, free\" in MiB", bad)
	}
}

// NVML's free memory must be nvidia-smi's, give or take what other
// processes took or gave back between the reads.
func TestMemoryAgrees(t *testing.T) {
	const total = 80 << 30
	m := gpu.DeviceMemory{Total: total, Free: 70 << 30}
	assert.NoError(t, memoryAgrees(m, total, 70<<30))
	assert.NoError(t, memoryAgrees(m, total, 70<<30+1<<30), "within 2% of the GPU")
	assert.ErrorContains(t, memoryAgrees(m, total, 60<<30), "NVML says GPU 0 has 70G free, nvidia-smi 60G")
	assert.ErrorContains(t, memoryAgrees(m, 40<<30, 30<<30), "NVML says GPU 0 has 80G, nvidia-smi 40G")
	assert.ErrorContains(t, memoryAgrees(gpu.DeviceMemory{Total: 1 << 30, Free: 2 << 30}, 1<<30, 2<<30), "2G free of 1G")
	small := gpu.DeviceMemory{Total: 4 << 30, Free: 4<<30 - 200<<20}
	assert.NoError(t, memoryAgrees(small, 4<<30, 4<<30), "at least 256 MiB of slack")
}

// The drop-in gpu-check writes is one the daemon takes.
func TestFitDropInIsTaken(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "pools.d", pool+".pool.d"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", pool+".pool"),
		[]byte("[Pool]\nDevices=0\nModel=/m.gguf\n[Engine]\nExecStart=/bin/true\nPort=8081\n"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", pool+".pool.d", "90-gpu-check.conf"), []byte(fitDropIn(81<<30)), 0o644))
	c, err := config.Load(dir)
	require.NoError(t, err)
	require.NotNil(t, c.Pools[0].MemoryRequired)
	assert.Equal(t, uint64(81<<30), *c.Pools[0].MemoryRequired)
}

// The need over the free memory stays within the GPU's size: only the
// free memory can refuse it.
func TestAboveFree(t *testing.T) {
	m := gpu.DeviceMemory{Total: 80 << 30, Free: 79 << 30}
	assert.Equal(t, uint64(79<<30+512<<20), aboveFree(m))
	full := gpu.DeviceMemory{Total: 80 << 30, Free: 80 << 30}
	assert.Equal(t, uint64(80<<30+1), aboveFree(full), "over the free memory even when nothing is used")
}

func TestJudgeFit(t *testing.T) {
	const uuid = "GPU-8f2c1a70-0000-4000-8000-000000000000"
	refused := "Call failed: the pool needs 79.5G of GPU memory (MemoryRequired=): GPU " + uuid + " has 79G free of 80G, used by pid 42 (python3, 1G); it starts once the memory is free: not enough free GPU memory"
	assert.Empty(t, judgeFit(refused, errors.New("exit status 1"), uuid, "u 0", 42))
	assert.Equal(t, []string{"a start that needs more memory than GPU 0 has free was not refused",
		`the refusal does not say GPU 0's free memory: ""`}, judgeFit("", nil, uuid, "u 0", 42))
	assert.Equal(t, []string{"the refused start counted a crash: CrashCount u 1"}, judgeFit(refused, errors.New("exit status 1"), uuid, "u 1", 42))
	assert.Equal(t, []string{"the refusal does not name the holder, pid 4: " + strconv.Quote(refused)},
		judgeFit(refused, errors.New("exit status 1"), uuid, "u 0", 4), "pid 42 is not pid 4")
	assert.Len(t, judgeFit("Call failed: GPU in use", errors.New("exit status 1"), uuid, "u 0", 42), 1, "another refusal is not this one")
}
