package gpu

import (
	"maps"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The actions read off NVIDIA's catalog, written out again by hand so a
// change to the table is a change to this list too.
var wantXIDActions = map[XIDAction][]uint64{
	XIDIgnore: {37, 38, 43, 44, 45, 61, 63, 66, 67, 92, 93, 106, 107, 121, 137, 141, 152, 153, 157, 160, 161},
	XIDRestart: {8, 11, 13, 25, 31, 32, 39, 40, 41, 60, 68, 69, 70, 71, 72, 75, 76, 77, 80, 82, 83, 84, 85, 86, 88, 89,
		94, 96, 97, 98, 99, 100, 101, 102, 103, 104, 105, 126, 127, 128, 129, 130, 131, 132, 133, 134, 135, 139},
	XIDReset: {46, 48, 54, 62, 64, 74, 95, 109, 110, 119, 120, 136, 140, 143,
		151, 155, 156, 158, 159, 167, 169},
	XIDLost: {79},
	// The driver's recovery action names theirs (ReadXID).
	XIDHold: {144, 145, 146, 147, 148, 149, 150, 154},
}

func TestEveryCatalogedXIDHasItsAction(t *testing.T) {
	var listed []uint64
	for action, xids := range wantXIDActions {
		for _, x := range xids {
			listed = append(listed, x)
			info := ClassifyXID(x)
			assert.Equal(t, action, info.Action, "XID %d", x)
			assert.Equal(t, x, info.XID)
			assert.NotEmpty(t, info.Meaning, "XID %d", x)
			assert.NotContains(t, info.Meaning, "not in pool-managerd's table", "XID %d", x)
			assert.NotEmpty(t, info.Remedy, "XID %d", x)
		}
	}
	slices.Sort(listed)
	assert.Equal(t, slices.Sorted(maps.Keys(xidTable)), listed, "the table and this list name the same XIDs")
}

// The XIDs the issue names, with why each lands where it does.
func TestKnownXIDsAreClassifiedByNVIDIAsCatalog(t *testing.T) {
	tests := []struct {
		xid    uint64
		action XIDAction
		why    string
	}{
		{79, XIDLost, "fallen off the bus: the catalog's RESTART_BM"},
		{48, XIDReset, "a double bit ECC error is remapped only at the next reset"},
		{95, XIDReset, "an uncontained memory error: RESET_GPU"},
		{119, XIDReset, "GSP RPC timeout: RESET_GPU"},
		{109, XIDReset, "the catalog says RESET_GPU, though the device plugin skips it"},
		{13, XIDRestart, "RESTART_APP: on a pool's GPU the application is the pool's engine"},
		{31, XIDRestart, "a page fault of the engine: RESTART_APP"},
		{94, XIDRestart, "a contained memory error: RESTART_APP"},
		{43, XIDIgnore, "the catalog's IGNORE: only the faulting channel was reset"},
		{45, XIDIgnore, "follows another XID or the kill of a process on the GPU, our own stops included"},
		{63, XIDIgnore, "a row marked for remapping: IGNORE; a pending remap shows in Usable"},
		{92, XIDIgnore, "a high single-bit ECC rate, corrected: IGNORE"},
	}
	for _, tt := range tests {
		info := ClassifyXID(tt.xid)
		assert.Equal(t, tt.action, info.Action, "XID %d: %s", tt.xid, tt.why)
	}
}

func TestAnXIDNotInTheTableHoldsTheGPU(t *testing.T) {
	for _, x := range []uint64{0, 1, 142, 999, ^uint64(0)} {
		_, known := xidTable[x]
		require.False(t, known, "XID %d", x)
		info := ClassifyXID(x)
		assert.Equal(t, XIDHold, info.Action, "fails closed: held until NVML reports the GPU usable")
		assert.Equal(t, x, info.XID)
		assert.Regexp(t, `^XID \d+ \(not in pool-managerd's table\)$`, info.Meaning)
		assert.Contains(t, info.Remedy, "NVML reports the GPU usable")
	}
}

// XID 61 is unused on current GPUs and only a warning in DCGM: no reset,
// a warning in the journal.
func TestXID61IsAWarningNotAReset(t *testing.T) {
	info := ClassifyXID(61)
	assert.Equal(t, XIDIgnore, info.Action)
	assert.True(t, info.Warn)
	assert.Contains(t, info.Remedy, "contact NVIDIA support")
	assert.False(t, ClassifyXID(43).Warn)
}

func TestResetRemediesNameTheGPU(t *testing.T) {
	const uuid = "GPU-8f2c1a70-0000-4000-8000-00000000000a"
	info := ClassifyXID(48)
	assert.Contains(t, info.Remedy, "nvidia-smi -r -i <uuid>")
	assert.Contains(t, info.RemedyFor(uuid), "nvidia-smi -r -i "+uuid)
	assert.NotContains(t, info.RemedyFor(uuid), "<uuid>")
	assert.Contains(t, ClassifyXID(79).Remedy, "reboot")
}

func TestXIDActionNames(t *testing.T) {
	assert.Equal(t, "ignore", XIDIgnore.String())
	assert.Equal(t, "restart", XIDRestart.String())
	assert.Equal(t, "reset", XIDReset.String())
	assert.Equal(t, "lost", XIDLost.String())
	assert.Equal(t, "hold", XIDHold.String())
	assert.Equal(t, "XIDAction(9)", XIDAction(9).String())
}
