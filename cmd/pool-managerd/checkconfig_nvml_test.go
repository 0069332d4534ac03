//go:build linux && cgo

package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh100"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/gpu"
	"github.com/llorch/pool-managerd/internal/gpu/nvmlmock"
)

// On an NVML host, where the files alone cannot relate an index to a
// UUID or a MIG device to its GPU, --check-config asks the inventory: one
// GPU named two ways, or a MIG device and its parent in two pools, are
// found before the second pool is held at run time.
func TestCheckConfigFindsOneGPUNamedTwoWaysOnAnNVMLHost(t *testing.T) {
	host := nvmlmock.New(dgxh100.New(), 1, 0, 9, 10, 11, 12, 13, 14)
	mig, err := host.AddMIG(2, nvml.GPU_INSTANCE_PROFILE_1_SLICE)
	require.NoError(t, err)
	newNVML = func() gpu.NVML { return gpu.NewNVMLWith(host.Server) }
	t.Cleanup(func() { newNVML = gpu.NewNVML })
	uuid := func(i int) string {
		u, ret := host.GPU(i).GetUUID()
		require.Equal(t, nvml.SUCCESS, ret)
		return u
	}

	dir := t.TempDir()
	for d := dir; d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
		require.NoError(t, os.Chmod(d, 0o755))
	}
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "pools.d"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "m.gguf"), []byte("GGUF\x03\x00\x00\x00 m"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pool-managerd.conf"), []byte("[Manager]\nMetricsTextfile=\n[Inventory]\nBackend=nvml\n"), 0o644))
	pool := func(id, devices string, port int) {
		require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", id+".pool"),
			fmt.Appendf(nil, "[Pool]\nDevices=%s\nModel=%s/m.gguf\n[Engine]\nExecStart=/bin/sh --model %%m --port %%p\nPort=%d\nUser=nobody\n", devices, dir, port), 0o644))
	}
	check := func() (int, string) {
		var out, errb bytes.Buffer
		rc := run([]string{"--config-dir", dir, "--check-config"}, &out, &errb)
		return rc, errb.String()
	}

	pool("a", "0", 8081)
	pool("b", "3 "+mig.UUID, 8082)
	rc, errb := check()
	require.Equal(t, exitOK, rc, "GPU 0, and a MIG device of GPU 2 beside GPU 3: %s", errb)

	pool("c", uuid(0), 8083)
	pool("d", "2", 8084)
	rc, errb = check()
	assert.Equal(t, exitConfig, rc)
	assert.Contains(t, errb, filepath.Join(dir, "pools.d", "c.pool")+`:2: [Pool] Devices=: GPU "`+uuid(0)+`" is `+uuid(0)+`, which pool "a" names "0" (`)
	assert.Contains(t, errb, filepath.Join(dir, "pools.d", "d.pool")+`:2: [Pool] Devices=: GPU "2" is `+uuid(2)+`, whose MIG device "`+mig.UUID+`" pool "b" uses (`)
	assert.Contains(t, errb, ": 2 error(s) the pools would meet on this host:")
}
