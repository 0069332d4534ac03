//go:build linux && cgo

package gpu

import (
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/gpu/nvmlmock"
)

// A device's free memory is its total less what its processes use; a MIG
// device has its own slice and only its own processes; the holders come
// largest first, each once with its contexts summed.
func TestMemoryUseOfAGPUOrMIGDevice(t *testing.T) {
	for _, srv := range dgxServers {
		t.Run(srv.name, func(t *testing.T) {
			h := dgxHost(t, srv.new())
			migs := h.MIGs(2)
			lib := NewNVMLWith(h.Server)
			proc := fakeProc(t, map[int]map[string]string{
				101: {"comm": "llama-server\n", "cgroup": "0::/pool.slice/pool-engine-a.scope\n"},
				102: {"comm": "python3\n", "cgroup": "0::/user.slice/session-1.scope\n"},
			})
			total := h.GPU(0).MemoryInfo.Total
			require.NotZero(t, total)

			m, err := MemoryUse(lib, h.GPU(0).UUID, proc)
			require.NoError(t, err)
			assert.Equal(t, DeviceMemory{UUID: h.GPU(0).UUID, Total: total, Free: total}, m, "an idle GPU has all its memory free")

			h.RunComputeMemory(0, nil, 101, 2<<30)
			h.RunComputeMemory(0, nil, 102, 30<<30)
			h.RunComputeMemory(0, nil, 101, 1<<30) // a second context of 101
			m, err = MemoryUse(lib, h.GPU(0).UUID, proc)
			require.NoError(t, err)
			assert.Equal(t, total-33<<30, m.Free)
			assert.Equal(t, []MemoryHolder{
				{Holder{PID: 102, Command: "python3", Unit: "session-1.scope"}, 30 << 30},
				{Holder{PID: 101, Command: "llama-server", Unit: "pool-engine-a.scope"}, 3 << 30},
			}, m.Holders)

			h.StopCompute(0, 102)
			m, err = MemoryUse(lib, h.GPU(0).UUID, proc)
			require.NoError(t, err)
			assert.Equal(t, total-3<<30, m.Free, "memory given back is free again")

			// A MIG device: its own memory, its own processes.
			h.RunComputeMemory(2, migs[0], 202, 1<<30)
			h.RunComputeMemory(2, migs[1], 303, 2<<30)
			mm, err := MemoryUse(lib, migs[1].UUID, proc)
			require.NoError(t, err)
			require.NotZero(t, mm.Total)
			assert.Less(t, mm.Total, h.GPU(2).MemoryInfo.Total, "a MIG device's memory is its slice")
			assert.Equal(t, mm.Total-2<<30, mm.Free)
			assert.Equal(t, []MemoryHolder{{Holder{PID: 303}, 2 << 30}}, mm.Holders)
			assert.Zero(t, h.Stats().Open, "NVML shut down after each question")
		})
	}
}

func TestMemoryUseOnALostOrUnknownGPU(t *testing.T) {
	h := dgxHost(t, dgxServers[0].new())
	lib := NewNVMLWith(h.Server)
	h.SetHealth(0, nvmlmock.Health{Lost: true})
	_, err := MemoryUse(lib, h.GPU(0).UUID, "/proc")
	assert.ErrorIs(t, err, ErrGPULost)
	assert.ErrorContains(t, err, "memory of "+h.GPU(0).UUID)

	_, err = MemoryUse(lib, "GPU-00000000-0000-4000-8000-000000000000", "/proc")
	assert.ErrorIs(t, err, ErrNoSuchGPU)

	h.GPU(1).GetMemoryInfoFunc = func() (nvml.Memory, nvml.Return) { return nvml.Memory{}, nvml.ERROR_NO_PERMISSION }
	_, err = MemoryUse(lib, h.GPU(1).UUID, "/proc")
	assert.EqualError(t, err, "memory of "+h.GPU(1).UUID+": NVML: memory info: ERROR_NO_PERMISSION")

	h.FailInit(nvml.ERROR_LIBRARY_NOT_FOUND)
	_, err = MemoryUse(lib, h.GPU(2).UUID, "/proc")
	assert.ErrorIs(t, err, ErrNoLibrary)
}

func TestBytesAreWrittenAsSystemdDoes(t *testing.T) {
	for n, want := range map[uint64]string{0: "0B", 1023: "1023B", 1024: "1K", 1536: "1.5K", 30 << 30: "30G", 80<<30 + 80<<20: "80.1G", 3 << 40: "3T"} {
		assert.Equal(t, want, Bytes(n), "%d", n)
	}
}
