// Package manager is the daemon's core: the configured pools by id, each a
// supervisor with its pool file, kept in line with the configuration on a
// reload; the GPU events and holds that reach pools through their GPUs;
// the daemon's status, watchdog and staged-model pruning. The D-Bus
// surface reaches every operation here by pool id or lease id, with
// refusals a caller can match. Each pool's own state lives in its
// supervisor.
package manager

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/metrics"
	"github.com/llorch/pool-managerd/internal/supervisor"
)

// ErrNoSuchPool refuses an operation on a pool that is not configured.
var ErrNoSuchPool = errors.New("no such pool")

// Pool is one pool's supervisor as the manager drives it: a
// *supervisor.Supervisor, or what stands in for one where no systemd runs
// engines.
type Pool interface {
	Snapshot() supervisor.Snapshot
	Wait(ctx context.Context, cond func(supervisor.Snapshot) bool) (supervisor.Snapshot, error)
	// Run runs the pool's loop until ctx ends.
	Run(ctx context.Context)
	Adopt(ctx context.Context, keep func(owner string) bool) (bool, error)
	Ping(ctx context.Context) error
	Flush()

	Start() error
	Stop(ctx context.Context) error
	Drain(ctx context.Context, deadline time.Duration) (lifecycle.DrainResult, error)
	// Park gives the pool's GPUs to another pool of its group: its
	// engine is drained and stopped, the pool left Idle, or put to sleep
	// where it can (Sleep=vllm), the pool left Sleeping.
	Park(ctx context.Context, deadline time.Duration) (lifecycle.DrainResult, error)
	Reload(ctx context.Context, ref string, drainDeadline time.Duration) (string, error)
	ResetBreaker()
	AllowRestart() error
	EnsureReady(ctx context.Context, timeout time.Duration) error
	RestoreIdle() bool
	// KeepIdle makes a stopped pool with IdleStopSec= idle since since,
	// and says whether it is.
	KeepIdle(since time.Time) bool

	AcquireLease(owner string) (string, error)
	ReleaseLease(id string) error
	ReleaseLeaseAs(id, owner string) error
	ReleaseOwner(owner string) int

	XID(uuid string, xid uint64)
	GPUUnhealthy(uuid, why string)
	GPUUsable(uuid string)
}

var _ Pool = (*supervisor.Supervisor)(nil)

// Manager holds the supervised pools; a configuration reload adds,
// replaces and removes them while calls go on.
type Manager struct {
	mu    sync.RWMutex
	pools map[string]*entry
	// retiring are removed pools still draining: their engines are still
	// on their GPUs.
	retiring map[string]*entry
	// cfg is the running configuration (nil for a manager made by New).
	cfg *config.Config
	// unhealthy are the GPUs held for a reset, each watched until usable.
	unhealthy map[string]bool

	// ctx bounds the manager's own work: drains on a reload, GPU watches.
	ctx context.Context
	o   Options
	pub Publisher
	// applying serializes reloads; reloads serializes ReloadConfig's read
	// and apply, files the drop-ins written.
	applying, reloads, files sync.Mutex
	// changed wakes the status watcher after a reload, xidChanged the XID
	// watcher.
	changed, xidChanged chan struct{}
	// warn writes the entries others can cause at will (XIDs of their
	// processes), rate-limited.
	warn *journal.Limiter
	// groups are the queues of turns of the groups of pools that share
	// GPUs, by name (guarded by mu).
	groups map[string]*group
}

// entry is one configured pool as the manager runs it.
type entry struct {
	cfg    *config.Pool // nil for a pool given to New
	pool   Pool
	cancel context.CancelFunc
}

// New returns a manager of the given pools, which run elsewhere: the
// registry alone, without a configuration to keep them in line with.
func New(pools ...Pool) *Manager {
	m := newManager(context.Background(), Options{})
	for _, p := range pools {
		m.pools[p.Snapshot().ID] = &entry{pool: p, cancel: func() {}}
	}
	return m
}

func newManager(ctx context.Context, o Options) *Manager {
	o = o.withDefaults()
	return &Manager{
		warn:       journal.NewLimiter(o.Log, journal.LimitBurst, journal.LimitWindow),
		pools:      map[string]*entry{},
		retiring:   map[string]*entry{},
		unhealthy:  map[string]bool{},
		ctx:        ctx,
		o:          o,
		changed:    make(chan struct{}, 1),
		xidChanged: make(chan struct{}, 1),
	}
}

// Metrics is the set the manager's pools count in; nil for a manager
// made by New.
func (m *Manager) Metrics() *metrics.Set { return m.o.Metrics }

// Pools returns the supervisors, sorted by id.
func (m *Manager) Pools() []Pool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	var out []Pool
	for _, id := range m.ids() {
		out = append(out, m.pools[id].pool)
	}
	return out
}

// Pool returns one pool's supervisor.
func (m *Manager) Pool(id string) (Pool, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	e, ok := m.pools[id]
	if !ok {
		return nil, fmt.Errorf("pool %q: %w", id, ErrNoSuchPool)
	}
	return e.pool, nil
}

// IDs lists the pool ids, sorted.
func (m *Manager) IDs() []string {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.ids()
}

func (m *Manager) ids() []string {
	ids := make([]string, 0, len(m.pools))
	for id := range m.pools {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

// AcquireLease takes a lease on a pool for owner. A member of a group
// with StartOnLease= is started in its group's turn first.
func (m *Manager) AcquireLease(pool, owner string) (string, error) {
	e, err := m.entry(pool)
	if err != nil {
		return "", err
	}
	if e.cfg == nil || e.cfg.Group == "" || !e.cfg.StartOnLease {
		return e.pool.AcquireLease(owner)
	}
	// Bounded like the pool's own wait for a start, with the awake
	// member's drain before it; the lease is taken within the turn, so
	// that no swap parks the pool in between.
	ctx, cancel := context.WithTimeout(m.ctx, e.cfg.GroupDrain+lifecycle.DefaultWakeTimeout)
	defer cancel()
	var id string
	err = m.inTurn(ctx, pool, e, false, func(p Pool) error {
		if err := p.EnsureReady(ctx, 0); err != nil {
			return err
		}
		id, err = p.AcquireLease(owner)
		return err
	})
	return id, err
}

// ReleaseLease gives a lease back; a lease id naming no pool is
// lifecycle.ErrNoSuchLease like any unknown lease.
func (m *Manager) ReleaseLease(id string) error {
	pool, ok := supervisor.LeasePool(id)
	p, err := m.Pool(pool)
	if !ok || err != nil {
		return fmt.Errorf("lease %q: %w", id, lifecycle.ErrNoSuchLease)
	}
	return p.ReleaseLease(id)
}

// ReleaseLeaseAs gives back a lease owner holds.
func (m *Manager) ReleaseLeaseAs(id, owner string) error {
	pool, ok := supervisor.LeasePool(id)
	p, err := m.Pool(pool)
	if !ok || err != nil {
		return fmt.Errorf("lease %q: %w", id, lifecycle.ErrNoSuchLease)
	}
	return p.ReleaseLeaseAs(id, owner)
}

// ReleaseOwner releases every lease owner holds on any pool.
func (m *Manager) ReleaseOwner(owner string) int {
	n := 0
	for _, p := range m.Pools() {
		n += p.ReleaseOwner(owner)
	}
	return n
}

// Drain drains a pool (see supervisor.Drain), which then stays stopped
// across a daemon restart, until Start.
func (m *Manager) Drain(ctx context.Context, pool string, deadline time.Duration) (lifecycle.DrainResult, error) {
	p, err := m.Pool(pool)
	if err != nil {
		return lifecycle.DrainResult{}, err
	}
	res, err := p.Drain(ctx, deadline)
	if err == nil {
		m.markStopped(pool)
	}
	return res, err
}

// Reload swaps a pool's model and keeps it for the next start (see
// ReloadModel).
func (m *Manager) Reload(ctx context.Context, pool, ref string, drainDeadline time.Duration) (string, error) {
	return m.ReloadModel(ctx, pool, ref, drainDeadline, false)
}

// Start starts a stopped pool, and forgets that the operator stopped it.
// A member of a group starts in its group's turn: after the awake
// member's park.
func (m *Manager) Start(pool string) error {
	e, err := m.entry(pool)
	if err != nil {
		return err
	}
	m.clearStopped(pool)
	return m.inTurn(m.ctx, pool, e, true, func(p Pool) error { return p.Start() })
}

// EnsureReady answers once a pool is Ready, starting it if it is idle,
// stopped, failed or in backoff (see supervisor.EnsureReady); like Start
// it forgets that the operator stopped it. A member of a group waits for
// its group's turn (see inTurn).
func (m *Manager) EnsureReady(ctx context.Context, pool string, timeout time.Duration) error {
	e, err := m.entry(pool)
	if err != nil {
		return err
	}
	m.clearStopped(pool)
	return m.inTurn(ctx, pool, e, false, func(p Pool) error { return p.EnsureReady(ctx, timeout) })
}

// Stop is a drain with deadline 0; the pool stays stopped across a
// daemon restart or upgrade (not a reboot), until Start.
func (m *Manager) Stop(ctx context.Context, pool string) error {
	p, err := m.Pool(pool)
	if err != nil {
		return err
	}
	err = p.Stop(ctx)
	if err == nil {
		m.markStopped(pool)
	}
	return err
}

// ResetBreaker closes a pool's circuit breakers.
func (m *Manager) ResetBreaker(pool string) error {
	p, err := m.Pool(pool)
	if err != nil {
		return err
	}
	p.ResetBreaker()
	return nil
}

// AllowRestart lets a pool's held restart through once.
func (m *Manager) AllowRestart(pool string) error {
	p, err := m.Pool(pool)
	if err != nil {
		return err
	}
	return p.AllowRestart()
}
