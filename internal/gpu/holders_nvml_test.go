//go:build linux && cgo

package gpu

import (
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/gpu/nvmlmock"
)

// NVML's running compute processes, by GPU or MIG UUID: a MIG device has
// only its own instance's, its GPU all of them; each comes with its
// command and systemd unit from /proc, or its PID alone once it is gone.
func TestComputeProcessesOfAGPUOrMIGDevice(t *testing.T) {
	for _, srv := range dgxServers {
		t.Run(srv.name, func(t *testing.T) {
			h := dgxHost(t, srv.new())
			migs := h.MIGs(2)
			require.Len(t, migs, 2)
			h.RunCompute(0, nil, 101)
			h.RunCompute(2, migs[0], 202)
			h.RunCompute(2, migs[1], 303)
			h.RunCompute(2, migs[1], 303) // NVML lists a process once per context
			proc := fakeProc(t, map[int]map[string]string{
				101: {"comm": "llama-server\n", "cgroup": "0::/system.slice/pool-engine-a.scope\n"},
				202: {"cmdline": "/usr/bin/python3\x00-m\x00vllm\x00", "cgroup": "1:name=systemd:/system.slice/pool-engine-b.scope\n0::/\n"},
			})
			lib := NewNVMLWith(h.Server)
			engineA := Holder{PID: 101, Command: "llama-server", Unit: "pool-engine-a.scope"}
			engineB := Holder{PID: 202, Command: "python3", Unit: "pool-engine-b.scope"}
			gone := Holder{PID: 303}

			for _, tt := range []struct {
				name, uuid string
				want       []Holder
			}{
				{"a GPU", h.GPU(0).UUID, []Holder{engineA}},
				{"an idle GPU", h.GPU(1).UUID, nil},
				{"a MIG device", migs[0].UUID, []Holder{engineB}},
				{"the other MIG device", migs[1].UUID, []Holder{gone}},
				{"the GPU of both", h.GPU(2).UUID, []Holder{engineB, gone}},
			} {
				got, err := ComputeProcesses(lib, tt.uuid, proc)
				require.NoError(t, err, tt.name)
				if tt.want == nil {
					assert.Empty(t, got, tt.name)
				} else {
					assert.Equal(t, tt.want, got, tt.name)
				}
			}

			h.StopCompute(0, 101)
			got, err := ComputeProcesses(lib, h.GPU(0).UUID, proc)
			require.NoError(t, err)
			assert.Empty(t, got, "free once the process has stopped")
			assert.Zero(t, h.Stats().Open, "NVML shut down after each question")
		})
	}
}

func TestComputeProcessesOnALostOrUnknownGPU(t *testing.T) {
	h := dgxHost(t, dgxServers[0].new())
	lib := NewNVMLWith(h.Server)
	h.SetHealth(0, nvmlmock.Health{Lost: true})
	_, err := ComputeProcesses(lib, h.GPU(0).UUID, "/proc")
	assert.ErrorIs(t, err, ErrGPULost)
	assert.ErrorContains(t, err, "compute processes on "+h.GPU(0).UUID)

	_, err = ComputeProcesses(lib, "GPU-00000000-0000-4000-8000-000000000000", "/proc")
	assert.ErrorIs(t, err, ErrNoSuchGPU)

	h.GPU(1).GetComputeRunningProcessesFunc = func() ([]nvml.ProcessInfo, nvml.Return) { return nil, nvml.ERROR_NO_PERMISSION }
	_, err = ComputeProcesses(lib, h.GPU(1).UUID, "/proc")
	assert.EqualError(t, err, "compute processes on "+h.GPU(1).UUID+": NVML: running compute processes: ERROR_NO_PERMISSION")

	h.FailInit(nvml.ERROR_LIBRARY_NOT_FOUND)
	_, err = ComputeProcesses(lib, h.GPU(2).UUID, "/proc")
	assert.ErrorIs(t, err, ErrNoLibrary)
}
