//go:build linux && cgo

package gpu

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/config"
)

// The real binding on a host without the driver: errors, never a crash.
// go-nvml would kill the process on any call before a successful Init.
func TestRealNVMLWithoutDriver(t *testing.T) {
	lib := NewNVML()
	if err := lib.Init(); err == nil {
		require.NoError(t, lib.Shutdown())
		t.Skip("libnvidia-ml is installed here")
	} else {
		require.ErrorIs(t, err, ErrNoLibrary)
		assert.Equal(t, "NVML: libnvidia-ml.so.1 not found (is the NVIDIA driver installed?); use [Inventory] Backend=static with Device= lines on hosts without it", err.Error())
	}

	_, err := lib.DeviceCount()
	assert.Error(t, err)
	_, err = lib.DeviceByIndex(0)
	assert.Error(t, err)
	_, err = lib.DeviceByUUID("GPU-8f2c1a70-0000-4000-8000-000000000000")
	assert.Error(t, err)
	_, err = lib.NewEventSet()
	assert.Error(t, err)
	assert.Error(t, lib.Shutdown())

	_, err = Load(config.Inventory{Backend: config.BackendNVML}, lib, "")
	assert.ErrorIs(t, err, ErrNoLibrary)

	inv, err := Load(withBackend(staticCfg, config.BackendAuto), nil, "")
	require.NoError(t, err)
	assert.Equal(t, SourceStatic, inv.Source)
	assert.ErrorIs(t, inv.Fallback, ErrNoLibrary)

	err = WatchXID(context.Background(), lib, []string{"0"}, func(string, uint64) {})
	assert.ErrorIs(t, err, ErrNoLibrary)
}
