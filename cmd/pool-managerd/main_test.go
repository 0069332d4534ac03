package main

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
)

// The shipped example configuration passes on a host that has what it
// names: its engine, its models, its user (pool-engine, made by the
// sandbox) and, from the static inventory, its GPUs.
func TestCheckConfigGood(t *testing.T) {
	sandbox.Need(t)
	for _, f := range []string{"/usr/bin/llama-server", "/var/lib/models/llama-3-8b-q4.gguf", "/var/lib/pool-managerd/models/nomic-embed-text-v1.5.Q8_0.gguf"} {
		hostFile(t, f)
	}
	dir := t.TempDir()
	copyTree(t, "../../packaging/examples", dir)
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "pool-managerd.conf.d"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pool-managerd.conf.d", "static.conf"), []byte("[Inventory]\nBackend=static\n"), 0o644))
	var out, errb bytes.Buffer
	rc := run([]string{"--config-dir", dir, "--check-config"}, &out, &errb)
	require.Equal(t, exitOK, rc, errb.String())
	assert.Contains(t, out.String(), "pool llama8b")
	assert.Contains(t, out.String(), "/usr/bin/llama-server --model /var/lib/models/llama-3-8b-q4.gguf --port 8081 --host 127.0.0.1 -ngl 99")
	assert.Contains(t, out.String(), "pool embed")
}

func TestCheckConfigBad(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "pools.d"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", "bad.pool"),
		[]byte("[Pool]\nDevices=0\nModel=m.gguf\n[Engine]\nExecStart=/bin/engine\nPort=99999\n"), 0o644))
	var out, errb bytes.Buffer
	rc := run([]string{"--config-dir", dir, "--check-config"}, &out, &errb)
	assert.Equal(t, exitConfig, rc)
	assert.Empty(t, out.String())
	assert.Contains(t, errb.String(), "1 configuration error(s)")
	assert.Contains(t, errb.String(), filepath.Join(dir, "pools.d", "bad.pool")+":6: [Engine] Port=: 99999 is out of range [1, 65535]")
}

// --check-config shows the drop-ins it applied, in order, like systemctl
// cat, and the values they set.
func TestCheckConfigShowsDropIns(t *testing.T) {
	dir, rdir, m := t.TempDir(), t.TempDir(), t.TempDir()
	// The models, where the pool's own user reaches them.
	for d := m; d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
		require.NoError(t, os.Chmod(d, 0o755))
	}
	for _, f := range []string{"a.gguf", "b.gguf"} {
		require.NoError(t, os.WriteFile(filepath.Join(m, f), []byte("GGUF\x03\x00\x00\x00 "+f), 0o644))
	}
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "pools.d", "p.pool.d"), 0o755))
	require.NoError(t, os.MkdirAll(filepath.Join(rdir, "pools.d", "p.pool.d"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pool-managerd.conf"), []byte("[Manager]\nRuntimeDir="+rdir+"\n[Inventory]\nBackend=static\nDevice=0 GPU-8f2c1a70-0000-4000-8000-000000000000 /dev/nvidia0\n"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", "p.pool"),
		[]byte("[Pool]\nDevices=0\nModel="+m+"/a.gguf\n[Engine]\nExecStart=/bin/sh\nPort=9000\n"), 0o644))
	etc := filepath.Join(dir, "pools.d", "p.pool.d", "50-Model.conf")
	rt := filepath.Join(rdir, "pools.d", "p.pool.d", "60-slots.conf")
	require.NoError(t, os.WriteFile(etc, []byte("[Pool]\nModel="+m+"/b.gguf\n"), 0o644))
	require.NoError(t, os.WriteFile(rt, []byte("[Pool]\nSlots=7\n"), 0o644))
	var out, errb bytes.Buffer
	rc := run([]string{"--config-dir", dir, "--check-config"}, &out, &errb)
	require.Equal(t, exitOK, rc, errb.String())
	assert.Regexp(t, `(?m)^  drop-in +`+regexp.QuoteMeta(etc)+`\n  drop-in +`+regexp.QuoteMeta(rt)+`$`, out.String())
	assert.Contains(t, out.String(), m+"/b.gguf")
	assert.Regexp(t, `slots +7`, out.String())
}

func TestPrintSchedule(t *testing.T) {
	var out, errb bytes.Buffer
	rc := run([]string{"--config-dir", "../../packaging/examples", "--print-schedule", "14", "--crash-after", "1s"}, &out, &errb)
	require.Equal(t, exitOK, rc, errb.String())
	s := out.String()
	assert.Contains(t, s, "restart schedule of pool llama8b")
	assert.Contains(t, s, "process breaker closed -> open")
	assert.Contains(t, s, "storm warning (6/10)")
	assert.Contains(t, s, "STORM process_storm")
	assert.True(t, strings.Index(s, "STORM") > strings.Index(s, "storm warning"))
}

func TestUsageErrors(t *testing.T) {
	var out, errb bytes.Buffer
	assert.Equal(t, exitUsage, run([]string{"--print-schedule", "3", "--crash-reason", "gremlins"}, &out, &errb))
	assert.Equal(t, exitUsage, run([]string{"stray"}, &out, &errb))
}

// hostFile makes a file the sandbox's host lacks, for as long as the test
// runs: an executable script under a bin directory, else a tiny model.
func hostFile(t *testing.T, path string) {
	t.Helper()
	if _, err := os.Stat(path); err == nil {
		return
	}
	require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
	if strings.Contains(path, "/bin/") {
		require.NoError(t, os.WriteFile(path, []byte("#!/bin/sh\nexit 0\n"), 0o755))
	} else {
		require.NoError(t, os.WriteFile(path, []byte("GGUF\x03\x00\x00\x00 model"), 0o644))
	}
	t.Cleanup(func() { os.Remove(path) })
}

// copyTree copies the regular files under from to to.
func copyTree(t *testing.T, from, to string) {
	t.Helper()
	require.NoError(t, filepath.WalkDir(from, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(from, p)
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(to, rel), 0o755)
		}
		copyFile(t, p, filepath.Join(to, rel))
		return nil
	}))
}
