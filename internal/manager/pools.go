package manager

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/engine"
	"github.com/llorch/pool-managerd/internal/gpu"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/metrics"
	"github.com/llorch/pool-managerd/internal/model"
	"github.com/llorch/pool-managerd/internal/supervisor"
)

// Options are what a manager runs its pools with. Open needs Metrics and
// Stager.
type Options struct {
	Log     *slog.Logger
	Metrics *metrics.Set
	Stager  *model.Stager
	// Users gives the engines of pools without User= users of their own
	// (*users.Table); a removed pool's is retired, kept for it.
	Users Users
	// Inventory resolves the pools' Devices= to GPUs.
	Inventory *gpu.Inventory
	// Runtime starts the engines of the supervisors NewPool builds by
	// default.
	Runtime *engine.Runtime
	// NVML opens the host's NVML, for the pools' GPU holders, the XID watch
	// and a held GPU's health; nil is gpu.NewNVML.
	NVML func() gpu.NVML
	// NewPool builds a pool's supervisor, its loop not yet running; nil
	// builds a *supervisor.Supervisor on Runtime.
	NewPool func(*config.Pool) (Pool, error)

	// GPUFirstCheck, then GPUCheckEvery, is how soon and how often a GPU
	// held for a reset is asked whether it is usable again: the driver may
	// set its recovery action a moment after the XID. GPUResetWait bounds
	// how long GPUResetCommand waits for the GPU's pools to stop,
	// GPUResetTimeout how long the command may run. Zero: the defaults.
	GPUFirstCheck, GPUCheckEvery  time.Duration
	GPUResetWait, GPUResetTimeout time.Duration
	// Journalctl runs journalctl, which follows the kernel's journal
	// entries for the driver's XID lines; nil is "journalctl" from PATH.
	Journalctl []string
	// ProcRoot is where a process's cgroup is ("/proc").
	ProcRoot string
}

func (o Options) withDefaults() Options {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.NVML == nil {
		o.NVML = gpu.NewNVML
	}
	if o.ProcRoot == "" {
		o.ProcRoot = "/proc"
	}
	for _, d := range []struct {
		v   *time.Duration
		def time.Duration
	}{
		{&o.GPUFirstCheck, 5 * time.Second},
		{&o.GPUCheckEvery, 30 * time.Second},
		{&o.GPUResetWait, 2 * time.Minute},
		{&o.GPUResetTimeout, 5 * time.Minute},
	} {
		if *d.v == 0 {
			*d.v = d.def
		}
	}
	return o
}

// Users is the table of the engines' own users.
type Users interface {
	supervisor.Accounts
	Retire(pool string) error
}

// Publisher shows the pools to the world (the D-Bus server): a reload
// tells it which pools came, changed or went.
type Publisher interface {
	PutPool(Pool) error
	RemovePool(id string)
}

// Open builds and runs a supervisor for each of cfg's pools; a pool that
// cannot be set up (an unknown GPU) fails it. ctx bounds the manager's own
// work (drains on a reload, GPU watches); the pools' loops run until
// Close.
func Open(ctx context.Context, cfg *config.Config, o Options) (*Manager, error) {
	m := newManager(ctx, o)
	if m.o.NewPool == nil {
		m.o.NewPool = m.supervisor
	}
	m.cfg = cfg
	if err := m.checkShared(cfg); err != nil {
		return nil, err
	}
	for _, p := range cfg.Pools {
		e, err := m.newPool(p)
		if err != nil {
			for _, e := range m.pools {
				e.cancel()
			}
			return nil, err
		}
		m.pools[p.ID] = e
		if len(p.DropIns) > 0 {
			m.o.Log.Info("pool configured with drop-ins", journal.PoolID, p.ID, journal.DropIn, strings.Join(p.DropIns, " "))
		}
	}
	return m, nil
}

// SetPublisher makes pub the one a reload tells of its changes.
func (m *Manager) SetPublisher(pub Publisher) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.pub = pub
}

func (m *Manager) publisher() Publisher {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.pub
}

// Config is the running configuration.
func (m *Manager) Config() *config.Config {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.cfg
}

// supervisor is the real pool: a supervisor whose engines run on the
// runtime.
func (m *Manager) supervisor(p *config.Pool) (Pool, error) {
	inv := m.o.Inventory
	var accounts supervisor.Accounts
	if m.o.Users != nil {
		accounts = m.o.Users
	}
	c, err := supervisor.FromPool(p, &m.Config().Manager, inv, m.o.Stager, accounts)
	if err != nil {
		return nil, err
	}
	if inv.Source == gpu.SourceNVML {
		gpus, _ := inv.Resolve(p.Devices)
		c.Holders = supervisor.GPUHolders(inv, gpus, m.o.NVML())
		c.Memory = supervisor.GPUMemory(gpus, m.o.NVML())
	}
	if p.Group != "" {
		c.Asleep = func() []string { return m.asleepPeers(p.ID, p.Group) }
	}
	return supervisor.New(c, m.o.Runtime, m.o.Log, m.o.Metrics), nil
}

// newPool builds a pool and runs its loop.
func (m *Manager) newPool(p *config.Pool) (*entry, error) {
	s, err := m.o.NewPool(p)
	if err != nil {
		return nil, err
	}
	// Not m.ctx: the loop must outlive SIGTERM long enough to flush.
	ctx, cancel := context.WithCancel(context.Background())
	go s.Run(ctx)
	return &entry{cfg: p, pool: s, cancel: cancel}, nil
}

// Adopt takes over the engines a previous daemon left running, keeping
// the leases of owners keep says are still there; a pool with none to
// adopt starts in the background if it starts on its own (the first start
// of a big model hashes it for minutes).
func (m *Manager) Adopt(ctx context.Context, keep func(owner string) bool) {
	running := map[string]bool{}
	for _, id := range m.IDs() {
		m.mu.RLock()
		e := m.pools[id]
		m.mu.RUnlock()
		adopted, err := e.pool.Adopt(ctx, keep)
		if err != nil {
			m.o.Log.Error("cannot adopt the pool's engine", journal.PoolID, id, journal.Error, err.Error())
		}
		running[id] = adopted
		switch {
		case e.cfg != nil && e.cfg.Group != "":
			// One member up at a time: see startGroups.
			if adopted {
				m.clearStopped(id)
			}
		case adopted:
			// It runs: whatever a mark says, the operator's last word
			// was a start.
			m.clearStopped(id)
		case m.stoppedByOperator(id):
			m.o.Log.Info("pool stopped by the operator stays stopped until started", journal.PoolID, id)
		case e.pool.RestoreIdle():
			// As systemd keeps a unit's state across its own restart: a
			// pool idle before stays idle until used (a reboot clears
			// the runtime directory, and AutoStart= then applies).
			m.o.Log.Info("pool idle before the daemon restart stays idle until a lease or EnsureReady", journal.PoolID, id)
		case e.cfg.AutoStart:
			go m.start(e)
		}
	}
	m.startGroups(running, func(id string, e *entry) bool {
		return e.cfg.AutoStart && !m.stoppedByOperator(id) && !e.pool.RestoreIdle()
	})
}

func (m *Manager) start(e *entry) {
	if err := e.pool.Start(); err != nil {
		m.o.Log.Error("pool did not start", journal.PoolID, e.cfg.ID, journal.Error, err.Error())
	}
}

// Close flushes every pool's state to disk and ends its loop. The engines
// run on in their scopes, for the next daemon to adopt.
func (m *Manager) Close() {
	// Not under the lock: a pool's loop may be reading the manager (a
	// group member's start asks which members sleep) as it is asked to
	// flush.
	m.mu.RLock()
	pools := make([]*entry, 0, len(m.pools))
	for _, e := range m.pools {
		pools = append(pools, e)
	}
	m.mu.RUnlock()
	for _, e := range pools {
		e.pool.Flush()
		e.cancel()
	}
}

// Apply makes cfg the running configuration (a reload): added pools
// start, removed pools are drained and stopped, changed pools are drained
// and started again on their new configuration (unless the operator
// stopped them; an idle or sleeping pool on demand stays idle, its change
// applied at its next start), unchanged ones run on. [Manager] and [Inventory]
// settings take effect on a restart of the daemon: the running ones stay
// (cfg's are replaced by them) and each one that changed is journaled. A
// pool that cannot be set up refuses the whole configuration: nothing
// changes. It is for a manager made by Open.
func (m *Manager) Apply(cfg *config.Config) error {
	_, err := m.apply(cfg)
	return err
}

// apply is Apply; it returns the warnings for the settings that wait for
// the next daemon restart.
func (m *Manager) apply(cfg *config.Config) ([]string, error) {
	m.applying.Lock()
	defer m.applying.Unlock()
	var warnings []string
	for _, s := range restartOnly(m.Config().Manager, cfg.Manager) {
		warnings = append(warnings, s+"= changed: takes effect at the next daemon restart")
		m.o.Log.Warn("manager setting changed: takes effect at the next daemon restart", journal.Setting, s)
	}
	cfg.Manager = m.Config().Manager
	// Building the new pools adds their models; what is allowed in the
	// end is the running configuration's (the new one, unless refused).
	defer func() { m.o.Stager.SetPoolModels(poolModels(m.Config())) }()
	next := map[string]*config.Pool{}
	for _, p := range cfg.Pools {
		next[p.ID] = p
	}
	if err := m.checkShared(cfg); err != nil {
		return nil, err
	}
	m.mu.RLock()
	running := make(map[string]*entry, len(m.pools))
	for id, e := range m.pools {
		running[id] = e
	}
	m.mu.RUnlock()
	// Build the new supervisors first: a pool that cannot be set up
	// (an unknown GPU) refuses the whole reload.
	fresh := map[string]*entry{}
	for id, p := range next {
		if old, ok := running[id]; ok && samePool(old.cfg, p) {
			continue
		}
		e, err := m.newPool(p)
		if err != nil {
			for _, f := range fresh {
				f.cancel()
			}
			return nil, err
		}
		fresh[id] = e
	}
	pub := m.publisher()
	removed, added, changed := 0, 0, 0
	for id, old := range running {
		if _, ok := next[id]; ok {
			continue
		}
		if pub != nil {
			pub.RemovePool(id)
		}
		// Off the registry, but its engine is on its GPUs until drained.
		m.mu.Lock()
		delete(m.pools, id)
		m.retiring[id] = old
		m.mu.Unlock()
		m.drain(id, old)
		m.o.Metrics.Forget(id)
		m.retireUser(id, old.cfg)
		m.mu.Lock()
		delete(m.retiring, id)
		m.mu.Unlock()
		m.clearStopped(id)
		removed++
	}
	for id, e := range fresh {
		// A pool resting (idle, or asleep: its engine serves nobody)
		// stays idle through a change: it applies at its next start. One
		// that is no pool on demand any more (IdleStopSec= gone, Pin=)
		// starts as AutoStart= says.
		var restingSince time.Time
		if old, ok := running[id]; ok {
			if s := old.pool.Snapshot(); s.State == lifecycle.Idle || s.State == lifecycle.Sleeping {
				restingSince = s.IdleSince
			}
			m.drain(id, old)
			if e.cfg.Engine.User != "" {
				m.retireUser(id, old.cfg)
			}
			changed++
		} else {
			added++
		}
		m.mu.Lock()
		m.pools[id] = e
		m.mu.Unlock()
		if pub != nil {
			if err := pub.PutPool(e.pool); err != nil {
				m.o.Log.Error("cannot publish the pool", journal.PoolID, id, journal.Error, err.Error())
			}
		}
		switch {
		case m.stoppedByOperator(id):
		case !restingSince.IsZero() && e.pool.KeepIdle(restingSince):
			m.o.Log.Info("pool changed while idle stays idle: the change applies at its next start", journal.PoolID, id)
		case e.cfg.AutoStart:
			go m.autoStart(e)
		}
	}
	m.mu.Lock()
	// A pool that runs on keeps its supervisor with what else changed
	// (AutoStart=, its drop-ins).
	for id, p := range next {
		if e, ok := m.pools[id]; ok && fresh[id] == nil && e.cfg != p {
			m.pools[id] = &entry{cfg: p, pool: e.pool, cancel: e.cancel}
		}
	}
	m.cfg = cfg
	m.mu.Unlock()
	for _, c := range []chan struct{}{m.changed, m.xidChanged} {
		select {
		case c <- struct{}{}:
		default:
		}
	}
	m.o.Log.Info(fmt.Sprintf("configuration reloaded: %d pool(s) added, %d removed, %d changed", added, removed, changed))
	m.Prune()
	return warnings, nil
}

// retireUser marks the user of a pool's own retired once the pool is gone
// or names a User=: the uid stays recorded for it.
func (m *Manager) retireUser(id string, was *config.Pool) {
	if m.o.Users == nil || was.Engine.User != "" {
		return
	}
	if err := m.o.Users.Retire(id); err != nil {
		m.o.Log.Error("cannot record the pool's own user as retired", journal.PoolID, id, journal.Error, err.Error())
	}
}

// drain drains a removed or replaced pool and ends its loop.
func (m *Manager) drain(id string, e *entry) {
	ctx, cancel := context.WithTimeout(m.ctx, 10*time.Minute)
	defer cancel()
	if _, err := e.pool.Drain(ctx, 30*time.Second); err != nil {
		m.o.Log.Error("cannot drain the pool", journal.PoolID, id, journal.Error, err.Error())
	}
	e.cancel()
}

// poolModels are the Model= refs of the configuration's pool files: a bus
// ref equal to one of them may lie outside the model directories.
func poolModels(cfg *config.Config) []string {
	var refs []string
	for _, p := range cfg.Pools {
		refs = append(refs, p.Model)
	}
	return refs
}
