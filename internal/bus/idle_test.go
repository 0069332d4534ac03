package bus_test

import (
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	api "github.com/llorch/pool-managerd/dbus"
	"github.com/llorch/pool-managerd/internal/bus"
)

// poolCounter reads a pool counter off the metrics textfile (-1: not there).
func poolCounter(t *testing.T, dir, name string) float64 {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "metrics", "pool-managerd.prom"))
	if err != nil {
		return -1
	}
	m := regexp.MustCompile(`(?m)^pool_managerd_` + name + `\{pool_id="llama-8b"\} (\S+)$`).FindSubmatch(b)
	if m == nil {
		return -1
	}
	v, err := strconv.ParseFloat(string(m[1]), 64)
	require.NoError(t, err)
	return v
}

// goesIdle waits for the pool to go idle: its engine and scope gone, no
// crash counted, IdleSinceUSec set.
func goesIdle(t *testing.T, since time.Time) {
	t.Helper()
	waitProp(t, "llama-8b", "State", `s "idle"`)
	assert.Equal(t, "b false", getProp(t, "llama-8b", "Ready"))
	waitProp(t, "llama-8b", "Live", "b false")
	assert.Equal(t, "u 0", getProp(t, "llama-8b", "MainPID"))
	assert.Equal(t, "u 0", getProp(t, "llama-8b", "CrashCount"))
	assert.Equal(t, "t 0", getProp(t, "llama-8b", "NextRestartUSec"))
	v := getProp(t, "llama-8b", "IdleSinceUSec")
	us, err := strconv.ParseUint(v[2:], 10, 64)
	require.NoError(t, err, v)
	at := time.UnixMicro(int64(us))
	assert.True(t, at.After(since) && at.Before(time.Now().Add(time.Second)), "IdleSinceUSec %s", at)
	require.Eventually(t, func() bool {
		out, _ := try("systemctl", "is-active", "pool-engine-llama\\x2d8b.scope")
		return out != "active"
	}, 10*time.Second, 20*time.Millisecond, "the engine's scope is gone")
}

// A pool nobody uses goes idle, its engine and scope gone and no crash
// counted; leases asked of it share one start and are granted once it is
// ready; EnsureReady brings it back too; it goes idle again once unused.
func TestIdlePoolComesBackOnDemand(t *testing.T) {
	dir, _ := configure(t)
	f, err := os.OpenFile(filepath.Join(dir, "pools.d", "llama-8b.pool"), os.O_APPEND|os.O_WRONLY, 0)
	require.NoError(t, err)
	_, err = f.WriteString("[Pool]\nIdleStopSec=2\nStartOnLease=yes\n")
	require.NoError(t, err)
	require.NoError(t, f.Close())
	begin := time.Now()
	start(t, dir)
	waitProp(t, "llama-8b", "Ready", "b true")
	assert.Equal(t, "t 0", getProp(t, "llama-8b", "IdleSinceUSec"))
	goesIdle(t, begin)
	require.Eventually(t, func() bool { return poolCounter(t, dir, "idle_stops_total") == 1 }, 10*time.Second, 50*time.Millisecond)
	assert.Equal(t, 0.0, poolCounter(t, dir, "lease_starts_total"))
	out := sh(t, "journalctl", "-u", "pool-managerd.service", "--no-pager", "-o", "verbose", "MESSAGE=pool idle: engine stopped to give its GPUs back")
	assert.Contains(t, out, "REASON=idle")

	// Two routers' leases (the pool has two slots) share one start.
	router, err := dbus.ConnectSystemBus()
	require.NoError(t, err)
	defer router.Close()
	obj := router.Object(bus.Name, mgr)
	leases := make([]string, 2)
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for i := range leases {
		wg.Go(func() { errs[i] = obj.Call(bus.ManagerIface+".AcquireLease", 0, "llama-8b").Store(&leases[i]) })
	}
	wg.Wait()
	for i := range leases {
		require.NoError(t, errs[i])
		assert.Regexp(t, `^llama-8b/[0-9a-f]{32}$`, leases[i])
	}
	assert.Equal(t, `s "ready"`, getProp(t, "llama-8b", "State"))
	assert.Equal(t, "u 2", getProp(t, "llama-8b", "ActiveLeases"))
	assert.Equal(t, "t 0", getProp(t, "llama-8b", "IdleSinceUSec"))
	assert.Equal(t, "u 0", getProp(t, "llama-8b", "CrashCount"))
	require.Eventually(t, func() bool { return poolCounter(t, dir, "lease_starts_total") == 1 }, 10*time.Second, 50*time.Millisecond)

	// Held leases keep it up past IdleStopSec.
	time.Sleep(3 * time.Second)
	assert.Equal(t, `s "ready"`, getProp(t, "llama-8b", "State"))
	released := time.Now()
	for _, l := range leases {
		require.NoError(t, obj.Call(bus.ManagerIface+".ReleaseLease", 0, l).Err)
	}
	goesIdle(t, released.Add(time.Second))

	out, err = call("EnsureReady", "st", "llama-8b", "30000")
	require.NoError(t, err, out)
	assert.Equal(t, `s "ready"`, getProp(t, "llama-8b", "State"))
	assert.Equal(t, "b true", getProp(t, "llama-8b", "Ready"))
	require.Eventually(t, func() bool { return poolCounter(t, dir, "lease_starts_total") == 2 }, 10*time.Second, 50*time.Millisecond)
	assert.Equal(t, "u 0", getProp(t, "llama-8b", "CrashCount"))
	out, err = call("EnsureReady", "st", "llama-8b", "0")
	require.NoError(t, err, out, "a ready pool answers at once")

	// An absurd timeout is refused, naming the bound.
	out, err = call("EnsureReady", "st", "llama-8b", "86400000")
	assert.Error(t, err)
	assert.Contains(t, out, "timeout_ms 86400000 is more than 3600000")
}

// Without StartOnLease a lease on an idle pool is NotReady, naming how to
// bring it back; it stays idle across a daemon restart; EnsureReady after
// a Stop starts it and forgets the Stop.
func TestIdlePoolWithoutStartOnLease(t *testing.T) {
	dir, _ := configure(t)
	f, err := os.OpenFile(filepath.Join(dir, "pools.d", "llama-8b.pool"), os.O_APPEND|os.O_WRONLY, 0)
	require.NoError(t, err)
	_, err = f.WriteString("[Pool]\nIdleStopSec=1\n")
	require.NoError(t, err)
	require.NoError(t, f.Close())
	begin := time.Now()
	start(t, dir)
	goesIdle(t, begin)

	// Idle survives a daemon restart (its mark is under the runtime
	// directory, which a reboot clears): AutoStart= does not start it.
	since := getProp(t, "llama-8b", "IdleSinceUSec")
	sh(t, "systemctl", "restart", "pool-managerd.service")
	waitProp(t, "llama-8b", "State", `s "idle"`)
	assert.Equal(t, since, getProp(t, "llama-8b", "IdleSinceUSec"))
	time.Sleep(500 * time.Millisecond)
	assert.Equal(t, "b false", getProp(t, "llama-8b", "Live"))
	out, _ := try("systemctl", "is-active", "pool-engine-llama\\x2d8b.scope")
	assert.NotEqual(t, "active", out)

	router, err := dbus.ConnectSystemBus()
	require.NoError(t, err)
	defer router.Close()
	err = router.Object(bus.Name, mgr).Call(bus.ManagerIface+".AcquireLease", 0, "llama-8b").Err
	var derr dbus.Error
	require.ErrorAs(t, err, &derr)
	assert.Equal(t, api.ErrNotReady, derr.Name)
	assert.Contains(t, err.Error(), "is idle (no StartOnLease=): EnsureReady or Start brings it back")
	assert.Equal(t, `s "idle"`, getProp(t, "llama-8b", "State"))

	out, err = call("Stop", "s", "llama-8b")
	require.NoError(t, err, out)
	assert.Equal(t, `s "stopped"`, getProp(t, "llama-8b", "State"))
	assert.Equal(t, "t 0", getProp(t, "llama-8b", "IdleSinceUSec"))
	out, err = call("EnsureReady", "st", "llama-8b", "30000")
	require.NoError(t, err, out)
	// The reply comes from the pool; its properties follow from the
	// publisher a moment later.
	waitProp(t, "llama-8b", "State", `s "ready"`)
	_, err = os.Stat(filepath.Join(dir, "run", "stopped", "llama-8b"))
	assert.ErrorIs(t, err, os.ErrNotExist, "EnsureReady forgets the operator's Stop as Start does")
	_, err = os.Stat(filepath.Join(dir, "run", "idle", "llama-8b"))
	assert.ErrorIs(t, err, os.ErrNotExist, "a pool that is not idle has no idle mark")
}

// Reload of an idle pool records the new model (and keeps it as a
// drop-in) and starts nothing; a configuration change keeps it idle too;
// its next start loads the new model on the new configuration.
func TestReloadAndConfigChangeKeepAnIdlePoolIdle(t *testing.T) {
	dir, _ := configure(t)
	file := filepath.Join(dir, "pools.d", "llama-8b.pool")
	f, err := os.OpenFile(file, os.O_APPEND|os.O_WRONLY, 0)
	require.NoError(t, err)
	_, err = f.WriteString("[Pool]\nIdleStopSec=1\nStartOnLease=yes\n")
	require.NoError(t, err)
	require.NoError(t, f.Close())
	begin := time.Now()
	start(t, dir)
	waitProp(t, "llama-8b", "Ready", "b true")
	goesIdle(t, begin)
	since := getProp(t, "llama-8b", "IdleSinceUSec")

	out, err := call("Reload", "sst", "llama-8b", "b.gguf", "30000")
	require.NoError(t, err, out)
	assert.Equal(t, `s "b.gguf"`, getProp(t, "llama-8b", "Model"))
	assert.FileExists(t, filepath.Join(dir, "pools.d", "llama-8b.pool.d", "50-Model.conf"))

	src, err := os.ReadFile(file)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(file, []byte(regexp.MustCompile(`Slots=2`).ReplaceAllString(string(src), "Slots=3")), 0o644))
	out, err = call("ReloadConfig")
	require.NoError(t, err, out)
	assert.Equal(t, "u 3", getProp(t, "llama-8b", "Slots"))
	time.Sleep(time.Second)
	assert.Equal(t, `s "idle"`, getProp(t, "llama-8b", "State"), "neither the reload nor the change starts it")
	assert.Equal(t, "b false", getProp(t, "llama-8b", "Live"))
	assert.Equal(t, since, getProp(t, "llama-8b", "IdleSinceUSec"), "idle since it was")
	assert.Equal(t, `s "b.gguf"`, getProp(t, "llama-8b", "Model"))

	out, err = call("EnsureReady", "st", "llama-8b", "30000")
	require.NoError(t, err, out)
	assert.Equal(t, `s "ready"`, getProp(t, "llama-8b", "State"))
	assert.Equal(t, `s "b.gguf"`, getProp(t, "llama-8b", "Model"), "its start loaded the new model")
	assert.Contains(t, getProp(t, "llama-8b", "ModelDigest"), "sha256:")
}
