package main

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
)

// checkConfig runs the pool-managerd binary's --check-config on dir.
func checkConfig(t *testing.T, dir string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(os.Getenv(sandbox.BinEnv("pool-managerd")), "--config-dir", dir, "--check-config")
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		require.NoError(t, err)
	}
	return out.String(), errb.String(), cmd.ProcessState.ExitCode()
}

// --check-config of the installed binary finds what the pools would fail
// at when they start, every message with file and line, and exits 78;
// the same configuration made right passes.
func TestCheckConfigBinaryFindsWhatFailsAtRunTime(t *testing.T) {
	sandbox.Need(t)
	dir, err := os.MkdirTemp("", "check-config-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "pools.d"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pool-managerd.conf"), []byte(`[Manager]
MetricsTextfile=
[Inventory]
Backend=static
Device=0 GPU-8f2c1a70-0000-4000-8000-000000000000 /dev/nvidia0
Device=1 GPU-8f2c1a70-0000-4000-8000-000000000001 /dev/nvidia1
Device=2 GPU-8f2c1a70-0000-4000-8000-000000000002 /dev/nvidia2
`), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "engine"), []byte("#!/bin/sh\n"), 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "m.gguf"), []byte("GGUF\x03\x00\x00\x00 m"), 0o600))
	pool := func(id, dev string, port int, user string) {
		require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", id+".pool"), []byte("[Pool]\nDevices="+dev+"\nModel="+dir+"/m.gguf\n[Engine]\nExecStart="+dir+
			"/engine --model %m --port %p\nPort="+strconv.Itoa(port)+"\nUser="+user+"\n"), 0o644))
	}

	// What the files alone tell: two pools on one port, keys out of place.
	pool("a", "0", 8081, "nobody")
	pool("b", "1", 8081, "nobody")
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", "c.pool"), []byte("[Pool]\nDevices=2\nModel=m.gguf\nPort=8083\n[Engine]\nExecStrat=/bin/sh\n"), 0o644))
	out, errb, code := checkConfig(t, dir)
	assert.Equal(t, exitConfig, code, errb)
	assert.Empty(t, out)
	for _, w := range []string{
		dir + `/pools.d/b.pool:6: [Engine] Port=: 8081 is already the port of pool "a" (` + dir + `/pools.d/a.pool): each engine needs a port of its own`,
		dir + "/pools.d/c.pool:4: [Pool] Port=: unknown key in [Pool]: Port= belongs in [Engine]",
		dir + "/pools.d/c.pool:6: [Engine] ExecStrat=: unknown key in [Engine]: did you mean ExecStart=?",
		dir + "/pools.d/c.pool:5: [Engine] ExecStart=: missing",
	} {
		assert.Contains(t, errb, w)
	}
	everyLineNamesFileAndLine(t, errb)

	// What only the host tells: the engine and the model are root's
	// alone, a user that does not exist.
	require.NoError(t, os.Remove(filepath.Join(dir, "pools.d", "c.pool")))
	pool("b", "1", 8082, "no-such-engine-user")
	out, errb, code = checkConfig(t, dir)
	assert.Equal(t, exitConfig, code, errb)
	assert.Contains(t, out, "pool a", "the configuration itself is valid")
	for _, w := range []string{
		": 3 error(s) the pools would meet on this host:\n",
		dir + "/pools.d/a.pool:5: [Engine] ExecStart=: " + dir + "/engine is not executable by the engine's user nobody (uid 65534): mode 0700, owner 0, group 0",
		dir + "/pools.d/a.pool:3: [Pool] Model=: ",
		"not found or not readable by the engine's user nobody (uid 65534)",
		dir + `/pools.d/b.pool:7: [Engine] User=: user "no-such-engine-user" does not exist on this host`,
	} {
		assert.Contains(t, errb, w)
	}
	everyLineNamesFileAndLine(t, errb)

	// Made right, it passes.
	require.NoError(t, os.Chmod(filepath.Join(dir, "engine"), 0o755))
	require.NoError(t, os.Chmod(filepath.Join(dir, "m.gguf"), 0o644))
	pool("b", "1", 8082, "nobody")
	out, errb, code = checkConfig(t, dir)
	assert.Equal(t, exitOK, code, errb)
	assert.Contains(t, out, "pool b")
}

var fileLine = regexp.MustCompile(`^/\S+:[0-9]+: `)

// everyLineNamesFileAndLine checks the error lines (not the count that
// heads them).
func everyLineNamesFileAndLine(t *testing.T, stderr string) {
	t.Helper()
	n := 0
	for _, l := range strings.Split(strings.TrimSpace(stderr), "\n") {
		if strings.HasPrefix(l, "warning: ") || strings.HasSuffix(l, ":") {
			continue
		}
		n++
		assert.Regexp(t, fileLine, l)
	}
	assert.Positive(t, n)
}
