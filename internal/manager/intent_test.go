package manager_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/manager"
)

// A changed manager setting is a warning, not a refusal: the pools added
// in the same reload, and in every later one, are applied, while the
// running settings stay until the daemon restarts.
func TestReloadConfigWarnsOfRestartOnlySettings(t *testing.T) {
	h := newHost(t, static, map[string]string{"a": "0", "b": "1"})
	m := h.open(nil, nil)
	a := h.pool("a")
	require.NoError(t, os.WriteFile(filepath.Join(h.dir, config.ManagerFile),
		[]byte(staticConf(h.dir, "GPUResetCommand=/bin/true\n")+"[Manager]\nMetricsIntervalSec=30\n"), 0o644))
	h.writePools(map[string]string{"a": "0", "b": "1", "c": "2"})
	warnings, err := m.ReloadConfig()
	require.NoError(t, err)
	assert.Equal(t, []string{
		"[Manager] MetricsIntervalSec= changed: takes effect at the next daemon restart",
		"[Inventory] GPUResetCommand= changed: takes effect at the next daemon restart",
	}, warnings)
	assert.Equal(t, []string{"a", "b", "c"}, m.IDs())
	assert.Nil(t, m.Config().Manager.Inventory.GPUResetCommand, "the running settings stay")
	assert.Equal(t, 15*time.Second, m.Config().Manager.MetricsInterval)
	assert.Empty(t, a.Calls(), "an unchanged pool is not touched")
	assert.Contains(t, h.logs.String(), `SETTING="[Inventory] GPUResetCommand"`)

	h.writePools(map[string]string{"a": "0", "b": "1", "c": "2", "d": "3"})
	warnings, err = m.ReloadConfig()
	require.NoError(t, err)
	assert.Len(t, warnings, 2, "said again until the restart")
	assert.Equal(t, []string{"a", "b", "c", "d"}, m.IDs(), "a later pool change is applied too")
}

// A configuration with an error is refused with the reason, file and
// line, as an invalid argument; nothing changes.
func TestReloadConfigRefusedChangesNothing(t *testing.T) {
	h := newHost(t, static, map[string]string{"a": "0"})
	m := h.open(nil, nil)
	before := m.Config()
	h.writePools(map[string]string{"a": "0", "b": "1;[Pool];Colour=blue"})
	_, err := m.ReloadConfig()
	require.Error(t, err)
	assert.True(t, errors.Is(err, lifecycle.ErrInvalidArgument))
	assert.Contains(t, err.Error(), "configuration refused, the running configuration stays")
	assert.Regexp(t, `b\.pool:\d+: \[Pool\] Colour=: unknown key`, err.Error())
	assert.Equal(t, []string{"a"}, m.IDs())
	assert.Same(t, before, m.Config())
	assert.Len(t, h.Built(), 1)
	assert.Contains(t, h.logs.String(), "configuration reload refused")
}

// reopen is a daemon restart: a new manager on the same directories.
func reopen(t *testing.T, h *host) (*host, *manager.Manager) {
	t.Helper()
	h2 := &host{t: t, dir: h.dir, logs: &syncBuffer{}, reg: prometheus.NewRegistry(), pub: &publisher{}}
	return h2, h2.open(nil, nil)
}

// Stop and Drain hold across a daemon restart: the new daemon does not
// start the pool, nor does a reload that changes it; Start clears that.
func TestOperatorStopHoldsAcrossADaemonRestart(t *testing.T) {
	h := newHost(t, static, map[string]string{"a": "0", "b": "1", "c": "2"})
	m := h.open(nil, nil)
	require.NoError(t, m.Stop(context.Background(), "a"))
	_, err := m.Drain(context.Background(), "c", time.Second)
	require.NoError(t, err)
	assert.FileExists(t, filepath.Join(h.dir, "run", "stopped", "a"))

	h, m = reopen(t, h)
	m.Adopt(context.Background(), func(string) bool { return true })
	require.Eventually(t, func() bool { return h.pool("b").did("start") }, time.Second, 5*time.Millisecond)
	assert.Equal(t, []string{"adopt"}, h.pool("a").Calls(), "stopped by the operator: not started")
	assert.Equal(t, []string{"adopt"}, h.pool("c").Calls(), "drained by the operator: not started")
	assert.Contains(t, h.logs.String(), "pool stopped by the operator stays stopped")

	// A reload that changes the pool builds it again, still stopped.
	h.writePools(map[string]string{"a": "0;[Pool];Slots=3", "b": "1", "c": "2"})
	_, err = m.ReloadConfig()
	require.NoError(t, err)
	time.Sleep(50 * time.Millisecond)
	assert.NotContains(t, h.pool("a").Calls(), "start")

	require.NoError(t, m.Start("a"))
	assert.NoFileExists(t, filepath.Join(h.dir, "run", "stopped", "a"))
	h, m = reopen(t, h)
	m.Adopt(context.Background(), func(string) bool { return true })
	require.Eventually(t, func() bool { return h.pool("a").did("start") }, time.Second, 5*time.Millisecond, "started again: AutoStart= holds")
}

// Enable and Disable write AutoStart= as a drop-in, persistent or under
// /run; neither restarts the pool, now or at the next reload.
func TestSetAutoStartWritesADropIn(t *testing.T) {
	h := newHost(t, static, map[string]string{"a": "0"})
	m := h.open(nil, nil)
	a := h.pool("a")
	etc := filepath.Join(h.dir, "pools.d", "a.pool.d", config.AutoStartDropIn)
	run := filepath.Join(h.dir, "run", "pools.d", "a.pool.d", config.AutoStartDropIn)

	require.NoError(t, m.SetAutoStart("a", false, false))
	b, err := os.ReadFile(etc)
	require.NoError(t, err)
	assert.Contains(t, string(b), "[Pool]\nAutoStart=no\n")
	assert.False(t, h.load().Pools[0].AutoStart)
	_, err = m.ReloadConfig()
	require.NoError(t, err)
	assert.Same(t, a, h.pool("a"), "no pool built again")
	assert.Empty(t, a.Calls())

	require.NoError(t, m.SetAutoStart("a", true, true))
	assert.FileExists(t, run)
	assert.True(t, h.load().Pools[0].AutoStart, "the runtime drop-in overrides the persistent one")
	b, _ = os.ReadFile(etc)
	assert.Contains(t, string(b), "AutoStart=no", "a runtime change leaves the persistent one")

	require.NoError(t, m.SetAutoStart("a", false, false))
	assert.NoFileExists(t, run, "a persistent change removes the runtime one that would override it")
	assert.False(t, h.load().Pools[0].AutoStart)

	assert.ErrorIs(t, m.SetAutoStart("nope", true, false), manager.ErrNoSuchPool)
}

// A reloaded model is kept as a drop-in (under /run for a runtime
// reload), and a reload of the configuration then keeps the pool as it
// is; a ref a unit file cannot hold is refused before the pool is asked,
// and a failed reload keeps nothing.
func TestReloadModelKeepsTheModel(t *testing.T) {
	h := newHost(t, static, map[string]string{"a": "0"})
	m := h.open(nil, nil)
	a := h.pool("a")
	ctx := context.Background()
	etc := filepath.Join(h.dir, "pools.d", "a.pool.d", config.ModelDropIn)
	run := filepath.Join(h.dir, "run", "pools.d", "a.pool.d", config.ModelDropIn)

	got, err := m.ReloadModel(ctx, "a", "b.gguf", time.Second, true)
	require.NoError(t, err)
	assert.Equal(t, "b.gguf", got)
	assert.FileExists(t, run)
	assert.NoFileExists(t, etc, "a runtime reload does not write the configuration directory")
	assert.Equal(t, "b.gguf", h.load().Pools[0].Model)

	got, err = m.Reload(ctx, "a", "c.gguf", time.Second)
	require.NoError(t, err)
	assert.Equal(t, "c.gguf", got)
	b, err := os.ReadFile(etc)
	require.NoError(t, err)
	assert.Contains(t, string(b), "[Pool]\nModel=c.gguf\n")
	assert.NoFileExists(t, run)
	assert.Equal(t, "c.gguf", h.load().Pools[0].Model)
	_, err = m.ReloadConfig()
	require.NoError(t, err)
	assert.Same(t, a, h.pool("a"), "the model it runs is the configured one: not built again")

	_, err = m.Reload(ctx, "a", "x.gguf\n[Engine]\nExecStart=/bin/sh", time.Second)
	assert.ErrorIs(t, err, lifecycle.ErrInvalidArgument)
	_, err = m.Reload(ctx, "a", "fail.gguf", time.Second)
	assert.ErrorIs(t, err, lifecycle.ErrReloadFailed)
	assert.Equal(t, []string{"reload b.gguf", "reload c.gguf", "reload fail.gguf"}, a.Calls())
	assert.Equal(t, "c.gguf", h.load().Pools[0].Model, "a failed reload keeps nothing")
}
