package manager

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"syscall"
	"time"

	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/lifecycle"
)

// RefusedError is a configuration a reload refused: the running one
// stays. It is an invalid argument to the caller.
type RefusedError struct{ Err error }

func (e *RefusedError) Error() string {
	return "configuration refused, the running configuration stays:\n" + e.Err.Error()
}
func (e *RefusedError) Unwrap() error        { return e.Err }
func (e *RefusedError) Is(target error) bool { return target == lifecycle.ErrInvalidArgument }

// ReloadConfig re-reads the configuration directory the manager was
// opened on and applies it (see Apply). It answers once it is applied,
// with warnings for the manager settings that changed but wait for the
// next daemon restart; a configuration it refuses (a *RefusedError)
// changes nothing. Both are journaled.
func (m *Manager) ReloadConfig() ([]string, error) {
	run := m.Config()
	if run == nil || run.Dir == "" {
		return nil, errors.New("no configuration directory to reload from")
	}
	m.reloads.Lock()
	defer m.reloads.Unlock()
	cfg, err := config.LoadRuntime(run.Dir, run.Manager.RuntimeDir)
	var warnings []string
	if err == nil {
		warnings, err = m.apply(cfg)
	}
	if err != nil {
		err = &RefusedError{err}
		m.o.Log.Error("configuration reload refused, the running configuration stays", journal.Error, err.Error())
		return nil, err
	}
	return warnings, nil
}

// restartOnly names the manager settings that differ between the running
// and the new configuration: all of them take effect at the next daemon
// restart (directories the pools' state, records and stages live in, the
// metrics writer and listener, the bus's admin group, the GPU inventory).
func restartOnly(run, next config.Manager) []string {
	type setting struct {
		name     string
		was, now any
	}
	var out []string
	for _, s := range []setting{
		{"[Manager] StateDir", run.StateDir, next.StateDir},
		{"[Manager] RuntimeDir", run.RuntimeDir, next.RuntimeDir},
		{"[Manager] CacheDir", run.CacheDir, next.CacheDir},
		{"[Manager] ModelsDir", run.ModelsDir, next.ModelsDir},
		{"[Manager] ModelDirs", run.ModelDirs, next.ModelDirs},
		{"[Manager] MetricsTextfile", run.MetricsTextfile, next.MetricsTextfile},
		{"[Manager] MetricsIntervalSec", run.MetricsInterval, next.MetricsInterval},
		{"[Manager] MetricsListen", run.MetricsListen, next.MetricsListen},
		{"[Manager] AdminGroup", run.AdminGroup, next.AdminGroup},
		{"[Inventory] Backend", run.Inventory.Backend, next.Inventory.Backend},
		{"[Inventory] Device", run.Inventory.Devices, next.Inventory.Devices},
		{"[Inventory] ControlDevice", run.Inventory.ControlDevices, next.Inventory.ControlDevices},
		{"[Inventory] GPUResetCommand", run.Inventory.GPUResetCommand, next.Inventory.GPUResetCommand},
	} {
		if !reflect.DeepEqual(s.was, s.now) && !(empty(s.was) && empty(s.now)) {
			out = append(out, s.name)
		}
	}
	return out
}

// empty says whether a list setting is unset (nil and empty are one).
func empty(v any) bool {
	r := reflect.ValueOf(v)
	return r.Kind() == reflect.Slice && r.Len() == 0
}

// samePool says whether a pool's supervisor can run on as it is: only
// AutoStart= (read when the daemon or the pool starts) and where the
// settings came from differ.
func samePool(a, b *config.Pool) bool {
	return config.SameSettings(a, b)
}

// stoppedDir holds a mark per pool the operator stopped: under RuntimeDir,
// so it holds across a daemon restart or upgrade and ends with the boot.
func (m *Manager) stoppedDir() string {
	cfg := m.Config()
	if cfg == nil || cfg.Manager.RuntimeDir == "" {
		return ""
	}
	return filepath.Join(cfg.Manager.RuntimeDir, "stopped")
}

// markStopped notes that the operator stopped pool (Stop, Drain). The
// mark is the file's being there (stoppedByOperator reads no content), so
// it is made in one create, with no temporary file, rename or fsync: it
// is on a drain's way to its reply, and RuntimeDir ends with the boot
// anyway.
func (m *Manager) markStopped(pool string) {
	d := m.stoppedDir()
	if d == "" {
		return
	}
	err := createMark(filepath.Join(d, pool))
	if errors.Is(err, fs.ErrNotExist) {
		// The first mark makes the directory.
		if err = os.MkdirAll(d, 0o755); err == nil {
			err = createMark(filepath.Join(d, pool))
		}
	}
	if err != nil {
		m.o.Log.Error("cannot keep the pool stopped across a daemon restart", journal.PoolID, pool, journal.Error, err.Error())
	}
}

func createMark(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|syscall.O_NOFOLLOW, 0o644)
	if err != nil {
		return err
	}
	_, err = f.WriteString("stopped by the operator; Start clears it\n")
	return errors.Join(err, f.Close())
}

// clearStopped forgets that the operator stopped pool.
func (m *Manager) clearStopped(pool string) {
	d := m.stoppedDir()
	if d == "" {
		return
	}
	if err := os.Remove(filepath.Join(d, pool)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		m.o.Log.Error("cannot forget that the operator stopped the pool", journal.PoolID, pool, journal.Error, err.Error())
	}
}

// stoppedByOperator says whether the operator stopped pool (and has not
// started it since). A mark that cannot be read still holds.
func (m *Manager) stoppedByOperator(pool string) bool {
	d := m.stoppedDir()
	if d == "" {
		return false
	}
	_, err := os.Lstat(filepath.Join(d, pool))
	return !errors.Is(err, fs.ErrNotExist)
}

// dropInDirs are pool's persistent and runtime drop-in directories.
func (m *Manager) dropInDirs(pool string) (persistent, runtime string, err error) {
	cfg := m.Config()
	if cfg == nil || cfg.Dir == "" {
		return "", "", errors.New("no configuration directory to write drop-ins in")
	}
	persistent, runtime = config.PoolDropInDirs(cfg.Dir, cfg.Manager.RuntimeDir, pool)
	return persistent, runtime, nil
}

// keep writes a drop-in for pool: under /run for a runtime change, else
// under the configuration directory, removing a runtime one of the same
// name, which would override it.
func (m *Manager) keep(pool, name string, text []byte, runtime bool) (string, error) {
	etc, run, err := m.dropInDirs(pool)
	if err != nil {
		return "", err
	}
	m.files.Lock()
	defer m.files.Unlock()
	if runtime {
		// RuntimeDir is the daemon's own (tmpfiles makes it at boot).
		if err := os.MkdirAll(filepath.Dir(filepath.Dir(run)), 0o755); err != nil {
			return "", err
		}
		return filepath.Join(run, name), config.WriteDropIn(run, name, text)
	}
	if err := config.WriteDropIn(etc, name, text); err != nil {
		return "", err
	}
	return filepath.Join(etc, name), config.RemoveDropIn(run, name)
}

// SetAutoStart is Enable (on) and Disable: AutoStart= as a drop-in, read
// when the daemon starts or the configuration is reloaded. It neither
// starts nor stops the pool.
func (m *Manager) SetAutoStart(pool string, on, runtime bool) error {
	if _, err := m.Pool(pool); err != nil {
		return err
	}
	v, what := "no", "disable"
	if on {
		v, what = "yes", "enable"
	}
	text, err := config.DropInText("Pool", "AutoStart", v, "written by pool-managerd for poolctl "+what+" (the bus's Enable, Disable)")
	if err != nil {
		return err
	}
	f, err := m.keep(pool, config.AutoStartDropIn, text, runtime)
	if err != nil {
		return err
	}
	m.updateConfig(pool, func(p *config.Pool) {
		p.AutoStart = on
		p.DropIns = withDropIn(p.DropIns, f)
	})
	m.o.Log.Info("pool AutoStart= changed", journal.PoolID, pool, journal.DropIn, f)
	return nil
}

// ReloadModel swaps a pool's model (see supervisor.Reload) and keeps it
// as a drop-in (Model=), so that the next start of the pool or the
// daemon loads it too; runtime keeps it under /run only, until the boot
// ends. A ref that cannot be written in a unit file is refused first.
func (m *Manager) ReloadModel(ctx context.Context, pool, ref string, drainDeadline time.Duration, runtime bool) (string, error) {
	e, err := m.entry(pool)
	if err != nil {
		return "", err
	}
	if _, err := config.DropInText("Pool", "Model", ref, ""); err != nil {
		return "", fmt.Errorf("model ref: %v: %w", err, lifecycle.ErrInvalidArgument)
	}
	// A reload starts a pool with no engine (or a sleeping one's new
	// model): a group member in its turn. An idle pool's only records
	// the model: no turn, no member parked.
	var model string
	reload := func(p Pool) error {
		var err error
		model, err = p.Reload(ctx, ref, drainDeadline)
		return err
	}
	if e.pool.Snapshot().State == lifecycle.Idle {
		err = reload(e.pool)
	} else {
		err = m.inTurn(ctx, pool, e, false, reload)
	}
	if err != nil {
		return model, err
	}
	text, err := config.DropInText("Pool", "Model", model, "written by pool-managerd for poolctl reload (the bus's Reload, ReloadEx)")
	var f string
	if err == nil {
		f, err = m.keep(pool, config.ModelDropIn, text, runtime)
	}
	if err != nil {
		return model, fmt.Errorf("%s is loaded, but the next start would load the configured model: %w", model, err)
	}
	m.updateConfig(pool, func(c *config.Pool) {
		c.Model = model
		c.DropIns = withDropIn(c.DropIns, f)
	})
	m.o.Log.Info("pool model kept for the next start", journal.PoolID, pool, journal.Model, model, journal.DropIn, f)
	return model, nil
}

func withDropIn(list []string, f string) []string {
	if slices.Contains(list, f) {
		return list
	}
	return append(slices.Clone(list), f)
}

// updateConfig changes the running configuration of pool as its drop-in
// now says, so that a reload sees no change to apply: the pool's entry is
// replaced, its supervisor kept.
func (m *Manager) updateConfig(pool string, change func(*config.Pool)) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e, ok := m.pools[pool]
	if !ok || e.cfg == nil {
		return
	}
	c := *e.cfg
	change(&c)
	m.pools[pool] = &entry{cfg: &c, pool: e.pool, cancel: e.cancel}
	if m.cfg != nil {
		next := *m.cfg
		next.Pools = slices.Clone(m.cfg.Pools)
		for i, p := range next.Pools {
			if p.ID == pool {
				next.Pools[i] = &c
			}
		}
		m.cfg = &next
	}
}
