//go:build linux && cgo

package gpu

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// On a host with the driver, the health and process queries answer for
// every GPU without an NVML error (a query the GPU lacks is skipped, not
// an error); without it, this test skips.
func TestRealGPUsAnswerHealthAndProcessQueries(t *testing.T) {
	lib := NewNVML()
	if err := lib.Init(); err != nil {
		t.Skipf("no NVML here: %v", err)
	}
	defer lib.Shutdown()
	n, err := lib.DeviceCount()
	require.NoError(t, err)
	for i := range n {
		d, err := lib.DeviceByIndex(i)
		require.NoError(t, err)
		uuid, err := d.UUID()
		require.NoError(t, err)
		ok, why, err := Usable(lib, uuid)
		require.NoError(t, err, uuid)
		t.Logf("GPU %d %s: usable %v %s", i, uuid, ok, why)
		hs, err := ComputeProcesses(lib, uuid, "/proc")
		require.NoError(t, err, uuid)
		t.Logf("GPU %d: compute processes %v", i, hs)
		migs, err := d.MIGDevices()
		require.NoError(t, err)
		for _, m := range migs {
			mu, err := m.UUID()
			require.NoError(t, err)
			_, _, err = Usable(lib, mu)
			assert.NoError(t, err, mu)
			_, err = ComputeProcesses(lib, mu, "/proc")
			assert.NoError(t, err, mu)
		}
	}
}
