package bus_test

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func ready(t *testing.T, pool string) {
	t.Helper()
	require.Eventually(t, func() bool {
		out, err := try("busctl", "get-property", "org.llorch.PoolManager1", "/org/llorch/PoolManager1/pool/"+strings.ReplaceAll(pool, "-", "_2d"),
			"org.llorch.PoolManager1.Pool", "Ready")
		return err == nil && out == "b true"
	}, 30*time.Second, 50*time.Millisecond, pool)
}

// restartDaemon restarts the daemon, with the engine stopped first when
// fresh is set, so that the pool starts from its configuration.
func restartDaemon(t *testing.T, fresh bool) {
	t.Helper()
	if fresh {
		sh(t, "systemctl", "stop", "pool-managerd.service")
		exec.Command("systemctl", "stop", "pool-engine-llama\\x2d8b.scope").Run()
		sh(t, "systemctl", "start", "pool-managerd.service")
		return
	}
	sh(t, "systemctl", "restart", "pool-managerd.service")
}

// A changed manager setting that needs a restart is a warning of
// ReloadConfig; a pool added in the same reload is applied, and so is a
// later one.
func TestReloadConfigWarnsAndAppliesPools(t *testing.T) {
	dir, _ := daemon(t)
	ready(t, "llama-8b")
	conf := filepath.Join(dir, "pool-managerd.conf")
	b, err := os.ReadFile(conf)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(conf, append(b, "[Manager]\nMetricsIntervalSec=30\n"...), 0o644))
	src, err := os.ReadFile(filepath.Join(dir, "pools.d", "llama-8b.pool"))
	require.NoError(t, err)
	add := func(id, dev string) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		p := strings.Replace(strings.Replace(string(src), "Devices=0", "Devices="+dev, 1), "Port=", fmt.Sprintf("Port=%d\n#", port), 1)
		require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", id+".pool"), []byte(p), 0o644))
		t.Cleanup(func() { exec.Command("systemctl", "stop", "pool-engine-"+id+".scope").Run() })
	}
	add("second", "1")
	out, err := call("ReloadConfig")
	require.NoError(t, err, out)
	assert.Equal(t, `as 1 "[Manager] MetricsIntervalSec= changed: takes effect at the next daemon restart"`, out)
	ready(t, "second")
	// The setting still waits; a later change of the pools is applied.
	require.NoError(t, os.Remove(filepath.Join(dir, "pools.d", "second.pool")))
	add("third", "1")
	sh(t, "systemctl", "reload", "pool-managerd.service")
	out, err = call("ListPools")
	require.NoError(t, err)
	assert.Equal(t, `a(so) 2 "llama-8b" "/org/llorch/PoolManager1/pool/llama_2d8b" "third" "/org/llorch/PoolManager1/pool/third"`, out)
	ready(t, "third")
	ready(t, "llama-8b")
}

// Stop holds across a daemon restart; Start clears it.
func TestStopHoldsAcrossADaemonRestart(t *testing.T) {
	dir, _ := daemon(t)
	ready(t, "llama-8b")
	out, err := call("Stop", "s", "llama-8b")
	require.NoError(t, err, out)
	assert.FileExists(t, filepath.Join(dir, "run", "stopped", "llama-8b"))
	restartDaemon(t, false)
	time.Sleep(2 * time.Second)
	assert.Equal(t, `s "stopped"`, getProp(t, "llama-8b", "State"), "still stopped after the restart")
	out, err = call("Start", "s", "llama-8b")
	require.NoError(t, err, out)
	ready(t, "llama-8b")
	assert.NoFileExists(t, filepath.Join(dir, "run", "stopped", "llama-8b"))
}

// Disable and Enable are drop-ins: persistent under the configuration
// directory, runtime under RuntimeDir; a disabled pool is not started by
// the next daemon.
func TestDisableHoldsAcrossADaemonRestart(t *testing.T) {
	dir, _ := daemon(t)
	ready(t, "llama-8b")
	etc := filepath.Join(dir, "pools.d", "llama-8b.pool.d", "50-AutoStart.conf")
	run := filepath.Join(dir, "run", "pools.d", "llama-8b.pool.d", "50-AutoStart.conf")

	out, err := call("Disable", "sb", "llama-8b", "true")
	require.NoError(t, err, out)
	assert.FileExists(t, run)
	assert.NoFileExists(t, etc, "a runtime change leaves the configuration directory alone")
	out, err = call("Disable", "sb", "llama-8b", "false")
	require.NoError(t, err, out)
	b, err := os.ReadFile(etc)
	require.NoError(t, err)
	assert.Contains(t, string(b), "[Pool]\nAutoStart=no\n")
	fi, err := os.Stat(etc)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o644), fi.Mode())
	assert.NoFileExists(t, run)
	assert.Equal(t, "b true", getProp(t, "llama-8b", "Ready"), "disabling does not stop the pool")

	restartDaemon(t, true)
	time.Sleep(2 * time.Second)
	assert.Equal(t, `s "stopped"`, getProp(t, "llama-8b", "State"), "a disabled pool is not started")

	out, err = call("Enable", "sb", "llama-8b", "true")
	require.NoError(t, err, out)
	restartDaemon(t, true)
	ready(t, "llama-8b")

	out, err = call("Enable", "sb", "nope", "false")
	assert.Error(t, err)
	assert.Contains(t, out, "no such pool")
}

// A reloaded model is kept across a daemon restart (a drop-in under the
// configuration directory); ReloadEx with runtime keeps it under /run
// only; bad options are refused, naming the option.
func TestReloadedModelHoldsAcrossADaemonRestart(t *testing.T) {
	dir, _ := daemon(t)
	ready(t, "llama-8b")
	etc := filepath.Join(dir, "pools.d", "llama-8b.pool.d", "50-Model.conf")
	run := filepath.Join(dir, "run", "pools.d", "llama-8b.pool.d", "50-Model.conf")

	out, err := call("Reload", "sst", "llama-8b", "b.gguf", "30000")
	require.NoError(t, err, out)
	assert.FileExists(t, etc)
	restartDaemon(t, true)
	ready(t, "llama-8b")
	assert.Equal(t, `s "b.gguf"`, getProp(t, "llama-8b", "Model"))

	out, err = call("ReloadEx", "ssta{sv}", "llama-8b", "a.gguf", "30000", "1", "runtime", "b", "true")
	require.NoError(t, err, out)
	assert.Equal(t, `s "a.gguf"`, out)
	assert.FileExists(t, run)
	b, err := os.ReadFile(etc)
	require.NoError(t, err)
	assert.Contains(t, string(b), "Model=b.gguf", "a runtime reload does not write the configuration directory")
	restartDaemon(t, true)
	ready(t, "llama-8b")
	assert.Equal(t, `s "a.gguf"`, getProp(t, "llama-8b", "Model"), "within the boot, the runtime model holds")

	for _, c := range []struct{ args []string }{
		{[]string{"1", "colour", "s", "blue"}},
		{[]string{"1", "runtime", "s", "yes"}},
	} {
		out, err := call(append([]string{"ReloadEx", "ssta{sv}", "llama-8b", "b.gguf", "30000"}, c.args...)...)
		assert.Error(t, err, "%v", c.args)
		assert.Contains(t, out, c.args[1], "the option is named")
	}
	assert.Equal(t, `s "a.gguf"`, getProp(t, "llama-8b", "Model"), "nothing changed")
}
