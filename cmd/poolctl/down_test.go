package main

import (
	"os/exec"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/stretchr/testify/assert"
)

// A call while the daemon is down says so and how to start it, keeping
// the bus's error name.
func TestADaemonThatIsDownIsNamedWithTheWayToStartIt(t *testing.T) {
	for _, name := range []string{"org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner"} {
		assert.Equal(t, name+": pool-managerd is not running (systemctl start pool-managerd)",
			describe(dbus.Error{Name: name, Body: []any{"The name org.llorch.PoolManager1 was not provided by any .service files"}}))
	}
}

// Nothing starts the daemon on a call: poolctl fails at once, for any
// user and command, and the daemon stays down.
func TestPoolctlAnswersAtOnceWhileTheDaemonIsDown(t *testing.T) {
	out, err := exec.Command("systemctl", "stop", "pool-managerd.service").CombinedOutput()
	if err != nil {
		// No unit at all is as down as it gets.
		t.Logf("systemctl stop: %v: %s", err, out)
	}
	for _, c := range []struct {
		user string
		args []string
	}{{viewer, []string{"list"}}, {viewer, []string{"status", "qwen"}}, {"", []string{"stop", "qwen"}}, {"", []string{"start", "qwen"}}, {"", []string{"reload", "qwen", "b.gguf"}}, {"", []string{"list", "--json"}}} {
		start := time.Now()
		r := poolctl(t, c.user, c.args...)
		assert.Less(t, time.Since(start), 5*time.Second, "%v answers at once", c.args)
		assert.Equal(t, 1, r.code, "%v: %s", c.args, r.stdout)
		assert.Contains(t, r.stderr, "pool-managerd is not running (systemctl start pool-managerd)", c.args)
	}
	state, _ := exec.Command("systemctl", "is-active", "pool-managerd.service").Output()
	assert.NotEqual(t, "active\n", string(state))
}
