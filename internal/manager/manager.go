// Package manager is the daemon's core as its D-Bus surface sees it: the
// pools by id, and every operation by pool id or lease id, with refusals a
// caller can match. Each pool's own state lives in its supervisor.
package manager

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/supervisor"
)

// ErrNoSuchPool refuses an operation on a pool that is not configured.
var ErrNoSuchPool = errors.New("no such pool")

// Manager holds the supervised pools; a configuration reload adds and
// removes them while calls go on.
type Manager struct {
	mu    sync.RWMutex
	pools map[string]*supervisor.Supervisor
}

// New returns a manager of the given pools.
func New(pools ...*supervisor.Supervisor) *Manager {
	m := &Manager{pools: map[string]*supervisor.Supervisor{}}
	for _, p := range pools {
		m.pools[p.Snapshot().ID] = p
	}
	return m
}

// Pools returns the supervisors, sorted by id.
func (m *Manager) Pools() []*supervisor.Supervisor {
	m.mu.RLock()
	defer m.mu.RUnlock()
	var out []*supervisor.Supervisor
	for _, id := range m.ids() {
		out = append(out, m.pools[id])
	}
	return out
}

// Put adds a pool or replaces the pool of the same id.
func (m *Manager) Put(p *supervisor.Supervisor) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.pools[p.Snapshot().ID] = p
}

// Remove drops a pool.
func (m *Manager) Remove(id string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.pools, id)
}

// Pool returns one pool's supervisor.
func (m *Manager) Pool(id string) (*supervisor.Supervisor, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	p, ok := m.pools[id]
	if !ok {
		return nil, fmt.Errorf("pool %q: %w", id, ErrNoSuchPool)
	}
	return p, nil
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

// AcquireLease takes a lease on a pool for owner.
func (m *Manager) AcquireLease(pool, owner string) (string, error) {
	p, err := m.Pool(pool)
	if err != nil {
		return "", err
	}
	return p.AcquireLease(owner)
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

// Drain drains a pool (see supervisor.Drain).
func (m *Manager) Drain(ctx context.Context, pool string, deadline time.Duration) (lifecycle.DrainResult, error) {
	p, err := m.Pool(pool)
	if err != nil {
		return lifecycle.DrainResult{}, err
	}
	return p.Drain(ctx, deadline)
}

// Reload swaps a pool's model (see supervisor.Reload).
func (m *Manager) Reload(ctx context.Context, pool, ref string, drainDeadline time.Duration) (string, error) {
	p, err := m.Pool(pool)
	if err != nil {
		return "", err
	}
	return p.Reload(ctx, ref, drainDeadline)
}

// Start starts a stopped pool.
func (m *Manager) Start(pool string) error {
	p, err := m.Pool(pool)
	if err != nil {
		return err
	}
	return p.Start()
}

// Stop is a drain with deadline 0.
func (m *Manager) Stop(ctx context.Context, pool string) error {
	p, err := m.Pool(pool)
	if err != nil {
		return err
	}
	return p.Stop(ctx)
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
