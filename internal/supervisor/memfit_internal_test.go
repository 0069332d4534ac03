//go:build linux && cgo

package supervisor

import (
	"bytes"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh100"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/engine"
	"github.com/llorch/pool-managerd/internal/gpu"
	"github.com/llorch/pool-managerd/internal/gpu/nvmlmock"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/model"
)

// memFit is a supervisor with only what the memory fit needs: GPUs of a
// mocked DGX H100 (80G each), read through go-nvml's mock.
type memFit struct {
	s    *Supervisor
	host *nvmlmock.Host
	logs *bytes.Buffer
}

func newMemFit(t *testing.T, required *uint64, gpus ...int) *memFit {
	host := nvmlmock.New(dgxh100.New())
	var gs []gpu.GPU
	for _, i := range gpus {
		gs = append(gs, gpu.GPU{Index: i, UUID: host.GPU(i).UUID})
	}
	logs := &bytes.Buffer{}
	s := &Supervisor{cfg: Config{Pool: "big", Memory: GPUMemory(gs, gpu.NewNVMLWith(host.Server)), MemoryRequired: required},
		log: slog.New(slog.NewTextHandler(logs, nil))}
	return &memFit{s: s, host: host, logs: logs}
}

// check runs the fit as the precheck does.
func (f *memFit) check(st model.Staged, own uint64) error {
	var mem []gpu.DeviceMemory
	var err error
	if f.s.memoryNeeded(st) > 0 {
		mem, err = f.s.cfg.Memory()
	}
	return f.s.memoryFits(st, mem, err, own)
}

func size(n uint64) *uint64 { return &n }

// sleeper is a real process for NVML's list to name.
func sleeper(t *testing.T) int {
	c := exec.Command("sleep", "60")
	require.NoError(t, c.Start())
	t.Cleanup(func() { c.Process.Kill(); c.Wait() })
	return c.Process.Pid
}

func stagedOf(n int64) model.Staged {
	var st model.Staged
	st.Size = n
	return st
}

// MemoryRequired= against a GPU's free memory: a start that fits goes
// on; one that does not is ErrNoGPUMemory naming each holder by pid,
// command and memory, largest first; once the memory is freed it fits.
func TestMemoryFitOfOneGPU(t *testing.T) {
	f := newMemFit(t, size(30<<30), 0)
	require.NoError(t, f.check(model.Staged{}, 0), "80G free covers 30G")

	big, small := sleeper(t), sleeper(t)
	f.host.RunComputeMemory(0, nil, small, 3<<30)
	f.host.RunComputeMemory(0, nil, big, 60<<30)
	f.host.RunComputeMemory(0, nil, 999999999, 1<<30) // gone meanwhile
	err := f.check(model.Staged{}, 0)
	require.ErrorIs(t, err, lifecycle.ErrNoGPUMemory)
	uuid := f.host.GPU(0).UUID
	assert.EqualError(t, err, "the pool needs 30G of GPU memory (MemoryRequired=): GPU "+uuid+" has 16G free of 80G, used by pid "+
		strconv.Itoa(big)+" (sleep, 60G), pid "+strconv.Itoa(small)+" (sleep, 3G), pid 999999999 (?, 1G); it starts once the memory is free: "+
		lifecycle.ErrNoGPUMemory.Error())

	f.host.StopCompute(0, big)
	assert.NoError(t, f.check(model.Staged{}, 0), "76G free once the big one ended")
}

// The pool's own leftover (in the scope's cgroup) dies before the engine
// starts: its memory counts as free. Anyone else's does not.
func TestMemoryFitCountsTheLeftoverOfThePoolsOwnScopeAsFree(t *testing.T) {
	self, err := engine.OpenProcess(os.Getpid())
	require.NoError(t, err)
	defer self.Close()
	require.NotZero(t, self.CgroupID)
	f := newMemFit(t, size(30<<30), 0)
	f.host.RunComputeMemory(0, nil, sleeper(t), 70<<30) // in this test's cgroup
	assert.NoError(t, f.check(model.Staged{}, self.CgroupID), "the scope's own leftover")
	assert.ErrorIs(t, f.check(model.Staged{}, self.CgroupID+1), lifecycle.ErrNoGPUMemory, "another cgroup's")
}

// Over several GPUs each must have its even share free, as a model split
// over them takes; the refusal names the GPU that lacks it.
func TestMemoryFitOfSeveralGPUsNeedsEachItsShare(t *testing.T) {
	f := newMemFit(t, size(100<<30), 0, 1)
	require.NoError(t, f.check(model.Staged{}, 0), "50G of 80G on each")
	f.host.RunComputeMemory(1, nil, sleeper(t), 40<<30)
	err := f.check(model.Staged{}, 0)
	require.ErrorIs(t, err, lifecycle.ErrNoGPUMemory)
	assert.ErrorContains(t, err, "GPU "+f.host.GPU(1).UUID+" has 40G free of 80G, its share is 50G")
	assert.NotContains(t, err.Error(), f.host.GPU(0).UUID, "the GPU with room is not named")
}

// A MIG device has its own memory: the fit is against its slice.
func TestMemoryFitOfAMIGDevice(t *testing.T) {
	host := nvmlmock.New(dgxh100.New())
	mig, err := host.AddMIG(3, nvml.GPU_INSTANCE_PROFILE_1_SLICE)
	require.NoError(t, err)
	s := &Supervisor{cfg: Config{Pool: "mig", MemoryRequired: size(8 << 30),
		Memory: GPUMemory([]gpu.GPU{{UUID: mig.UUID}}, gpu.NewNVMLWith(host.Server))}, log: slog.New(slog.DiscardHandler)}
	f := &memFit{s: s, host: host}
	mem, err := s.cfg.Memory()
	require.NoError(t, err)
	require.Less(t, mem[0].Total, uint64(80<<30), "the MIG device's slice")
	if mem[0].Total >= 8<<30 {
		assert.NoError(t, f.check(model.Staged{}, 0))
		host.RunComputeMemory(3, mig, sleeper(t), mem[0].Total-4<<30)
	}
	err = f.check(model.Staged{}, 0)
	require.ErrorIs(t, err, lifecycle.ErrNoGPUMemory)
	assert.ErrorContains(t, err, "GPU "+mig.UUID+" has ")
}

// Without MemoryRequired= the pool needs its model's size times 1.2: a
// file's size, a directory tree's total; MemoryRequired=0 turns the
// check off (NVML is not even asked).
func TestMemoryFitDefaultsToTheModelsSize(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "m.gguf"), bytes.Repeat([]byte("x"), 1000), 0o644))
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "tree", "sub"), 0o755))
	for name, n := range map[string]int{"config.json": 100, "a.safetensors": 600, "sub/b.safetensors": 300} {
		require.NoError(t, os.WriteFile(filepath.Join(dir, "tree", name), bytes.Repeat([]byte("y"), n), 0o644))
	}
	root, err := model.LookupUser("root")
	require.NoError(t, err)
	stager := model.New(dir, t.TempDir())

	for _, ref := range []string{filepath.Join(dir, "m.gguf"), filepath.Join(dir, "tree")} {
		src, err := stager.Resolve(ref, root)
		require.NoError(t, err, ref)
		require.Equal(t, int64(1000), src.Size, "%s: the file's or the tree's bytes", ref)
		st := model.Staged{Source: src}

		f := newMemFit(t, nil, 0)
		assert.Equal(t, uint64(1200), f.s.memoryNeeded(st), ref)
		f.host.GPU(0).MemoryInfo.Total = 1100
		err = f.check(st, 0)
		require.ErrorIs(t, err, lifecycle.ErrNoGPUMemory, ref)
		assert.ErrorContains(t, err, "the pool needs 1.2K of GPU memory (the model's 1000B times 1.2; set MemoryRequired= to change it)")
		f.host.GPU(0).MemoryInfo.Total = 1200
		assert.NoError(t, f.check(st, 0), ref)

		off := newMemFit(t, size(0), 0)
		off.host.GPU(0).MemoryInfo.Total = 1
		off.host.FailInit(nvml.ERROR_LIBRARY_NOT_FOUND)
		assert.Zero(t, off.s.memoryNeeded(st))
		assert.NoError(t, off.check(st, 0), "MemoryRequired=0: no check")
	}
}

// NVML failing to answer does not keep an engine from its start (its
// own start will tell), but it is logged.
func TestMemoryFitThatCannotReadTheMemoryLetsTheStartGoOn(t *testing.T) {
	f := newMemFit(t, size(30<<30), 0)
	f.host.SetHealth(0, nvmlmock.Health{Lost: true})
	require.NoError(t, f.check(model.Staged{}, 0))
	assert.Contains(t, f.logs.String(), "cannot read the free memory of the pool's GPUs")
}

// With the static inventory nothing tells the free memory: the check is
// skipped and says so once per inventory, however many pools start.
func TestMemoryFitOnTheStaticInventorySaysOnceItIsSkipped(t *testing.T) {
	logs := &bytes.Buffer{}
	inv := &gpu.Inventory{Source: gpu.SourceStatic}
	for _, pool := range []string{"a", "b", "a"} {
		s := &Supervisor{cfg: Config{Pool: pool, Inventory: inv}, log: slog.New(slog.NewTextHandler(logs, nil))}
		require.NoError(t, s.memoryFits(stagedOf(1<<40), nil, nil, 0))
	}
	assert.Equal(t, 1, bytes.Count(logs.Bytes(), []byte("GPU memory fit not checked: the static inventory cannot tell free memory")), logs.String())
}
