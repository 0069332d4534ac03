package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// systemctl daemon-reload (every unit edit, every package install) and
// daemon-reexec (a systemd upgrade) unload and load again every unit,
// running scopes included: the engines run on, untouched, whether they
// are starting or serving. The daemon is the built pool-managerd under
// the unit file as shipped.
func TestEnginesOutliveSystemdReloadsAndReexecs(t *testing.T) {
	sandbox.Need(t)
	installShim(t)
	daemon := os.Getenv(sandbox.BinEnv("pool-managerd"))
	// The engine loads its model for 4 s: long enough to reload systemd
	// while the pool is starting.
	md, err := os.MkdirTemp("", "slow-model-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(md) })
	require.NoError(t, os.Chmod(md, 0o755))
	model := filepath.Join(md, "slow.gguf")
	require.NoError(t, os.WriteFile(model, []byte("GGUF\x03\x00\x00\x00\nsim-load-time=4s\n"), 0o644))
	dir, _ := daemonDir(t, "rl", model, "[Health]\nIntervalSec=0.5\nTimeoutSec=0.5\n")
	t.Cleanup(func() {
		exec.Command("systemctl", "stop", "pool-managerd.service", "pool-engine-rl.scope").Run()
		os.Remove("/etc/systemd/system/pool-managerd.service")
		os.Remove("/etc/systemd/system/pool-managerd-engines.slice")
		exec.Command("systemctl", "daemon-reload").Run()
	})
	since := sh(t, "date", "+%Y-%m-%d %H:%M:%S")
	require.NoError(t, testpool.InstallDaemon("../..", daemon, dir))
	prop := func(name string) string {
		out, _ := exec.Command("busctl", "get-property", "org.llorch.PoolManager1", "/org/llorch/PoolManager1/pool/rl",
			"org.llorch.PoolManager1.Pool", name).CombinedOutput()
		return strings.TrimSpace(string(out))
	}
	daemonLog := func() string {
		out, _ := exec.Command("journalctl", "--no-pager", "--output=cat", "-u", "pool-managerd.service", "--since", since).CombinedOutput()
		return string(out)
	}

	// Starting: the engine runs and loads its model.
	require.Eventually(t, func() bool { return prop("State") == `s "starting"` && prop("MainPID") != "u 0" },
		20*time.Second, 20*time.Millisecond, "engine started:\n%s", daemonLog())
	engine := prop("MainPID")
	sh(t, "systemctl", "daemon-reload")
	require.Eventually(t, func() bool { return prop("Ready") == "b true" }, 30*time.Second, 50*time.Millisecond,
		"ready after a daemon-reload while starting:\n%s", daemonLog())
	assert.Equal(t, engine, prop("MainPID"), "the engine that was starting is the one that serves")
	assert.Equal(t, "u 0", prop("CrashCount"))

	// Serving: Ready is watched throughout.
	var unready atomic.Int32
	stop := make(chan struct{})
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			if prop("Ready") != "b true" {
				unready.Add(1)
			}
		}
	}()
	defer func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		<-watched
	}()
	for i, verb := range []string{"daemon-reload", "daemon-reload", "daemon-reload", "daemon-reexec", "daemon-reload"} {
		sh(t, "systemctl", verb)
		// Past the 500 ms a pool holds an exit for systemd's word, and
		// a few health probes.
		time.Sleep(1500 * time.Millisecond)
		assert.Equal(t, engine, prop("MainPID"), "after %s (%d)", verb, i+1)
		assert.Equal(t, "u 0", prop("CrashCount"), "after %s (%d)", verb, i+1)
		assert.Equal(t, `s "ready"`, prop("State"), "after %s (%d)", verb, i+1)
	}
	close(stop)
	<-watched
	assert.Zero(t, unready.Load(), "Ready stayed true through the reloads")
	log := daemonLog()
	for _, bad := range []string{"shim lost", "crashed", "restarting engine", "scope vanished", "stopped by an operator"} {
		assert.NotContains(t, log, bad, "daemon's journal:\n%s", log)
	}
	assert.Equal(t, "active", sh(t, "systemctl", "is-active", "pool-engine-rl.scope"))

	// The witness still hears systemd after all that: an operator's stop
	// is honoured as one.
	sh(t, "systemctl", "stop", "pool-engine-rl.scope")
	require.Eventually(t, func() bool { return prop("State") == `s "stopped"` }, 10*time.Second, 20*time.Millisecond,
		"an operator's stop after the reloads:\n%s", daemonLog())
	assert.Equal(t, "u 0", prop("CrashCount"))

	// Started again, and systemd re-executed while the engine loads.
	start := exec.Command("busctl", "--timeout=60", "call", "org.llorch.PoolManager1", "/org/llorch/PoolManager1",
		"org.llorch.PoolManager1.Manager", "Start", "s", "rl")
	require.NoError(t, start.Start())
	t.Cleanup(func() { start.Process.Kill(); start.Wait() })
	require.Eventually(t, func() bool {
		return prop("State") == `s "starting"` && prop("MainPID") != "u 0" && prop("MainPID") != engine
	}, 20*time.Second, 20*time.Millisecond, "engine started again:\n%s", daemonLog())
	engine = prop("MainPID")
	sh(t, "systemctl", "daemon-reexec")
	require.Eventually(t, func() bool { return prop("Ready") == "b true" }, 30*time.Second, 50*time.Millisecond,
		"ready after a daemon-reexec while starting:\n%s", daemonLog())
	time.Sleep(time.Second)
	assert.Equal(t, engine, prop("MainPID"), "the engine that was starting is the one that serves")
	assert.Equal(t, "u 0", prop("CrashCount"))
	assert.NotContains(t, daemonLog(), "shim lost")
}
