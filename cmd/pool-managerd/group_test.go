package main

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// --check-config refuses two pools on one GPU outside one Group=, naming
// both files and lines, and finds nothing wrong with their GPU in one
// group.
func TestCheckConfigSharedGPUs(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "pools.d"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pool-managerd.conf"), []byte("[Manager]\nAdminGroup=pool-admin\nMetricsTextfile=\n"+
		"[Inventory]\nBackend=static\nDevice=0 GPU-8f2c1a70-0000-4000-8000-000000000000 /dev/nvidia0\n"), 0o644))
	pool := func(port, more string) []byte {
		return []byte("[Pool]\nDevices=0\nModel=/models/m.gguf\n" + more + "[Engine]\nExecStart=/usr/bin/llama-server --model %m --port %p\nPort=" + port + "\n")
	}
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", "chat.pool"), pool("8081", ""), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", "code.pool"), pool("8082", "Group=gpu0\n"), 0o644))
	var out, errb bytes.Buffer
	rc := run([]string{"--config-dir", dir, "--check-config"}, &out, &errb)
	assert.Equal(t, exitConfig, rc)
	assert.Contains(t, errb.String(), filepath.Join(dir, "pools.d", "code.pool")+`:2: [Pool] Devices=: GPU "0" is already used by pool "chat" (`+
		filepath.Join(dir, "pools.d", "chat.pool")+`:2): pools share a GPU only with the same Group=`)

	require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", "chat.pool"), pool("8081", "Group=gpu0\n"), 0o644))
	out.Reset()
	errb.Reset()
	run([]string{"--config-dir", dir, "--check-config"}, &out, &errb)
	// This host lacks the engine and the model; the GPU is no matter.
	assert.NotContains(t, errb.String(), "Devices=")
}
