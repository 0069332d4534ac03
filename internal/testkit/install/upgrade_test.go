package install

import (
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

func unitState(t *testing.T) (active, enabled string) {
	t.Helper()
	a, _ := exec.Command("systemctl", "is-active", "pool-managerd.service").Output()
	e, _ := exec.Command("systemctl", "is-enabled", "pool-managerd.service").Output()
	return strings.TrimSpace(string(a)), strings.TrimSpace(string(e))
}

func daemonPID(t *testing.T) string {
	t.Helper()
	return sh(t, "systemctl", "show", "-p", "MainPID", "--value", "pool-managerd.service")
}

// upgrade installs the same .deb again: dpkg runs the postinst as for an
// upgrade (configure with the old version).
func upgrade(t *testing.T) {
	t.Helper()
	out, err := exec.Command("dpkg", "-i", glob(t, "pool-managerd_*.deb")).CombinedOutput()
	require.NoError(t, err, "dpkg -i (upgrade): %s", out)
}

// engineOf is the pool's engine as the bus and systemd tell it: its pid
// and its scope's invocation.
func engineOf(t *testing.T, id string) (pid, invocation string) {
	t.Helper()
	return poolProperty(id, "MainPID"), sh(t, "systemctl", "show", "-p", "InvocationID", "--value", "pool-engine-"+id+".scope")
}

// An operator's systemctl decides whether the daemon runs: an upgrade
// restarts only a running daemon and enables nothing, policy-rc.d can hold
// even that, and nobody's call on the bus starts a stopped daemon. The
// engines run on through every upgrade (each runs a daemon-reload, and
// restarts a running daemon): same pid, same scope, no crash.
func TestDebUpgradeAndTheBusLeaveAStoppedDaemonDown(t *testing.T) {
	sandbox.Need(t)
	sim := os.Getenv(sandbox.BinEnv("pool-engine-sim"))
	installDeb(t, "", map[string][]byte{"alpha": testpool.SimPoolFile(sim, "0", "tiny.gguf", 18441, "[Health]\nIntervalSec=0.5\nTimeoutSec=0.5\n")})
	waitReady(t, "alpha")

	// Running and enabled: restarted with the new files.
	pid := daemonPID(t)
	engine, inv := engineOf(t, "alpha")
	require.NotEqual(t, "u 0", engine)
	upgrade(t)
	active, enabled := unitState(t)
	assert.Equal(t, "active", active)
	assert.Equal(t, "enabled", enabled)
	assert.NotEqual(t, pid, daemonPID(t), "a running daemon is restarted by an upgrade")
	waitReady(t, "alpha")
	// Past the 500 ms a pool holds an exit for systemd's word.
	time.Sleep(time.Second)
	e, i := engineOf(t, "alpha")
	assert.Equal(t, engine, e, "the engine outlives the upgrade; journal:\n%s", journal())
	assert.Equal(t, inv, i, "in the same scope")
	assert.Equal(t, "u 0", poolProperty("alpha", "CrashCount"))
	assert.NotContains(t, sh(t, "journalctl", "--no-pager", "-o", "cat", "-u", "pool-managerd.service"), "shim lost")

	// policy-rc.d says no: not even a restart.
	require.NoError(t, os.WriteFile("/usr/sbin/policy-rc.d", []byte("#!/bin/sh\nexit 101\n"), 0o755))
	t.Cleanup(func() { os.Remove("/usr/sbin/policy-rc.d") })
	pid = daemonPID(t)
	upgrade(t)
	assert.Equal(t, pid, daemonPID(t), "policy-rc.d 101 holds the restart")
	time.Sleep(time.Second)
	e, i = engineOf(t, "alpha")
	assert.Equal(t, engine, e, "the engine outlives the daemon-reload of an upgrade")
	assert.Equal(t, inv, i)
	assert.Equal(t, "u 0", poolProperty("alpha", "CrashCount"))
	require.NoError(t, os.Remove("/usr/sbin/policy-rc.d"))

	// Enabled but stopped: an upgrade does not start it.
	sh(t, "systemctl", "stop", "pool-managerd.service")
	upgrade(t)
	active, enabled = unitState(t)
	assert.Equal(t, "inactive", active, "an upgrade starts no stopped daemon")
	assert.Equal(t, "enabled", enabled)

	// Disabled and stopped: it stays so through an upgrade.
	sh(t, "systemctl", "disable", "pool-managerd.service")
	upgrade(t)
	active, enabled = unitState(t)
	assert.Equal(t, "inactive", active, "an upgrade starts no disabled daemon")
	assert.Equal(t, "disabled", enabled, "an upgrade enables nothing the operator disabled")

	// Nobody's call starts it, and each fails at once.
	activatable := sh(t, "busctl", "list", "--activatable", "--no-pager")
	assert.NotContains(t, activatable, "org.llorch.PoolManager1", "no bus activation")
	for _, c := range []struct {
		name string
		args []string
		want string
	}{
		{"poolctl list as nobody", []string{"setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "poolctl", "list"},
			"pool-managerd is not running (systemctl start pool-managerd)"},
		{"poolctl status as nobody", []string{"setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "poolctl", "status", "alpha"},
			"pool-managerd is not running (systemctl start pool-managerd)"},
		{"poolctl stop as root", []string{"poolctl", "stop", "alpha"},
			"pool-managerd is not running (systemctl start pool-managerd)"},
		{"busctl as nobody", []string{"setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "busctl", "call",
			"org.llorch.PoolManager1", "/org/llorch/PoolManager1", "org.llorch.PoolManager1.Manager", "ListPools"},
			"org.llorch.PoolManager1"},
	} {
		start := time.Now()
		cmd := exec.Command(c.args[0], c.args[1:]...)
		out, err := cmd.CombinedOutput()
		took := time.Since(start)
		var ee *exec.ExitError
		require.ErrorAs(t, err, &ee, "%s: %s", c.name, out)
		assert.Equal(t, 1, ee.ExitCode(), "%s: %s", c.name, out)
		assert.Contains(t, string(out), c.want, c.name)
		assert.Less(t, took, 5*time.Second, "%s answers at once", c.name)
	}
	active, enabled = unitState(t)
	assert.Equal(t, "inactive", active, "no call on the bus started the daemon")
	assert.Equal(t, "disabled", enabled)

	// The operator's systemctl start still works, and a later upgrade
	// restarts the running, disabled daemon without enabling it.
	sh(t, "systemctl", "start", "pool-managerd.service")
	waitReady(t, "alpha")
	pid = daemonPID(t)
	engine, inv = engineOf(t, "alpha")
	upgrade(t)
	active, enabled = unitState(t)
	assert.Equal(t, "active", active)
	assert.Equal(t, "disabled", enabled)
	assert.NotEqual(t, pid, daemonPID(t), "a running daemon is restarted, enabled or not")
	waitReady(t, "alpha")
	time.Sleep(time.Second)
	e, i = engineOf(t, "alpha")
	assert.Equal(t, engine, e, "the engine outlives the upgrade; journal:\n%s", journal())
	assert.Equal(t, inv, i)
}
