//go:build linux && cgo

package gpu

import (
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxa100"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/gpu/nvmlmock"
)

// A GPU after a fault, as NVML reports it: lost, asking for a reset by
// the driver's recovery action, a pending or failed row remap, pending
// retired pages; a MIG device shares its GPU's state; GPUs without these
// queries are usable; the GPU beside it is untouched.
func TestUsableAfterAFault(t *testing.T) {
	all := nvmlmock.Health{}
	old := nvmlmock.Health{NoRecoveryAction: true, NoRowRemapping: true, NoPageRetirement: true}
	tests := []struct {
		name    string
		health  nvmlmock.Health
		mig     bool
		wantOK  bool
		wantWhy string
	}{
		{name: "a good GPU", health: all, wantOK: true},
		{name: "a MIG device of a good GPU", health: all, mig: true, wantOK: true},
		{name: "a good GPU whose driver has none of the queries", health: old, wantOK: true},
		{name: "a lost GPU", health: nvmlmock.Health{Lost: true}, wantWhy: "is lost"},
		{name: "a MIG device of a lost GPU", health: nvmlmock.Health{Lost: true}, mig: true, wantWhy: "is lost"},
		{name: "the driver asks for a reset", health: nvmlmock.Health{RecoveryAction: nvml.GPU_RECOVERY_ACTION_GPU_RESET},
			wantWhy: "needs a reset: the driver asks for a GPU reset"},
		{name: "the driver asks for a reboot", health: nvmlmock.Health{RecoveryAction: nvml.GPU_RECOVERY_ACTION_NODE_REBOOT},
			wantWhy: "needs a reset: the driver asks for a reboot of the host"},
		{name: "a row remap pending", health: nvmlmock.Health{RemapPending: true},
			wantWhy: "needs a reset: row remapping is pending (it takes effect at the next GPU reset)"},
		{name: "a MIG device of a GPU with a row remap pending", health: nvmlmock.Health{RemapPending: true}, mig: true,
			wantWhy: "needs a reset: row remapping is pending (it takes effect at the next GPU reset)"},
		{name: "a row remap failed", health: nvmlmock.Health{RemapFailed: true, RemapPending: true},
			wantWhy: "needs a reset: row remapping failed: the GPU's memory needs service"},
		{name: "retired pages pending", health: nvmlmock.Health{RetiredPagesPending: true, NoRowRemapping: true},
			wantWhy: "needs a reset: retired pages are pending (they take effect at the next GPU reset or reboot)"},
		{name: "pending pages where NVML cannot tell", health: nvmlmock.Health{RetiredPagesPending: true, NoPageRetirement: true}, wantOK: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := dgxHost(t, dgxa100.New())
			lib := NewNVMLWith(h.Server)
			h.SetHealth(2, tt.health)
			uuid := h.GPU(2).UUID
			if tt.mig {
				uuid = h.MIGs(2)[0].UUID
			}
			ok, why, err := Usable(lib, uuid)
			require.NoError(t, err)
			assert.Equal(t, tt.wantOK, ok)
			if tt.wantOK {
				assert.Empty(t, why)
			} else {
				assert.Contains(t, why, "GPU "+uuid+" ")
				assert.Contains(t, why, tt.wantWhy)
				if tt.health.Lost {
					assert.Contains(t, why, "(NVML: device "+uuid+": ERROR_GPU_IS_LOST)")
				}
			}

			ok, why, err = Usable(lib, h.GPU(3).UUID)
			require.NoError(t, err)
			assert.True(t, ok, "the GPU beside it: %s", why)
			assert.Zero(t, h.Stats().Open, "NVML shut down after each question")
		})
	}
}

// The hold on a GPU ends when NVML reports it usable again (after a
// reset), and a GPU NVML no longer lists is missing, not an error.
func TestUsableAgainAfterTheGPUIsReset(t *testing.T) {
	h := nvmlmock.New(dgxa100.New())
	lib := NewNVMLWith(h.Server)
	uuid := h.GPU(0).UUID

	h.SetHealth(0, nvmlmock.Health{Lost: true})
	ok, why, err := Usable(lib, uuid)
	require.NoError(t, err)
	require.False(t, ok)
	assert.Contains(t, why, "is lost")

	h.SetHealth(0, nvmlmock.Health{})
	ok, why, err = Usable(lib, uuid)
	require.NoError(t, err)
	assert.True(t, ok, why)

	ok, why, err = Usable(lib, "GPU-00000000-0000-4000-8000-000000000000")
	require.NoError(t, err)
	assert.False(t, ok)
	assert.Equal(t, "GPU GPU-00000000-0000-4000-8000-000000000000 is missing: NVML does not find it (NVML: device GPU-00000000-0000-4000-8000-000000000000: ERROR_NOT_FOUND)", why)
}

// When NVML cannot be asked, or answers something that says nothing
// about the GPU, Usable says so with an error, not a verdict.
func TestUsableWhenNVMLCannotTell(t *testing.T) {
	h := nvmlmock.New(dgxa100.New())
	lib := NewNVMLWith(h.Server)

	h.GPU(0).GetRemappedRowsFunc = func() (int, int, bool, bool, nvml.Return) { return 0, 0, false, false, nvml.ERROR_UNKNOWN }
	ok, why, err := Usable(lib, h.GPU(0).UUID)
	assert.False(t, ok)
	assert.Empty(t, why)
	assert.EqualError(t, err, "NVML: remapped rows: ERROR_UNKNOWN")

	h.GPU(1).GetRemappedRowsFunc = func() (int, int, bool, bool, nvml.Return) {
		return 0, 0, false, false, nvml.ERROR_RESET_REQUIRED
	}
	ok, why, err = Usable(lib, h.GPU(1).UUID)
	require.NoError(t, err)
	assert.False(t, ok)
	assert.Contains(t, why, "needs a reset (NVML: remapped rows: ERROR_RESET_REQUIRED)")

	h.FailInit(nvml.ERROR_LIBRARY_NOT_FOUND)
	_, _, err = Usable(lib, h.GPU(2).UUID)
	assert.ErrorIs(t, err, ErrNoLibrary)
	assert.Zero(t, h.Stats().Open)
}
