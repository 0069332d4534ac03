//go:build linux && cgo

package gpu

import (
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh100"
	"github.com/stretchr/testify/assert"

	"github.com/llorch/pool-managerd/internal/gpu/nvmlmock"
)

// An NVML event carries the XID's number only; for 144-150 and 154 the
// action is in the kernel's message, and the driver's recovery action,
// which NVML reports, names it: a reboot is never answered with a reset,
// and where NVML cannot say the GPU is held.
func TestXIDsWhoseMessageNamesTheActionFollowTheDriver(t *testing.T) {
	h := dgxHost(t, dgxh100.New())
	lib := NewNVMLWith(h.Server)
	tests := []struct {
		name   string
		health nvmlmock.Health
		action XIDAction
		says   string
	}{
		{"no recovery action", nvmlmock.Health{}, XIDIgnore, "the driver asks for nothing"},
		{"a GPU reset", nvmlmock.Health{RecoveryAction: nvml.GPU_RECOVERY_ACTION_GPU_RESET}, XIDReset, "the driver asks for a GPU reset"},
		{"drain and reset", nvmlmock.Health{RecoveryAction: nvml.GPU_RECOVERY_ACTION_DRAIN_AND_RESET}, XIDReset, "a GPU reset"},
		{"a node reboot", nvmlmock.Health{RecoveryAction: nvml.GPU_RECOVERY_ACTION_NODE_REBOOT}, XIDLost, "the driver asks for a reboot of the host"},
		{"drain NVLink peers", nvmlmock.Health{RecoveryAction: nvml.GPU_RECOVERY_ACTION_DRAIN_P2P}, XIDHold, ""},
		{"a driver without the query", nvmlmock.Health{NoRecoveryAction: true}, XIDHold, ""},
		{"a lost GPU", nvmlmock.Health{Lost: true}, XIDHold, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h.SetHealth(2, tt.health)
			for _, uuid := range []string{h.GPU(2).UUID, h.MIGs(2)[0].UUID} {
				for _, x := range []uint64{144, 145, 146, 147, 148, 149, 150, 154} {
					info := ReadXID(lib, uuid, x)
					assert.Equal(t, tt.action, info.Action, "XID %d on %s", x, uuid)
					assert.Contains(t, info.Meaning, tt.says)
					if tt.action == XIDLost {
						assert.Contains(t, info.Remedy, "reboot")
						assert.NotContains(t, info.Remedy, "nvidia-smi -r")
					}
				}
			}
			// Other XIDs are the catalog's, whatever the driver says.
			assert.Equal(t, XIDRestart, ReadXID(lib, h.GPU(2).UUID, 13).Action)
			assert.Equal(t, XIDReset, ReadXID(lib, h.GPU(2).UUID, 48).Action)
		})
	}
	// Without NVML: held.
	assert.Equal(t, XIDHold, ReadXID(missingLib(), h.GPU(2).UUID, 154).Action)
}
