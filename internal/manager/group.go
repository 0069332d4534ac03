package manager

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/llorch/pool-managerd/internal/check/sleep"
	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/supervisor"
)

// Pools with one [Pool] Group= share their GPUs and take turns on them:
// one member is awake at a time. A request that needs a member up (Start,
// EnsureReady, a lease with StartOnLease) takes a turn: the turns of a
// group are served in order (first come, first served), each parking the
// awake member (Park: a drain, leases honoured up to GroupDrainSec=) and
// then starting its own pool. A request for the member already awake, with
// no turn under way, is served at once; the turns queued for the pool a
// swap just woke are served with it, not one swap each.

// maxTurns bounds the requests queued in one group, as lifecycle's
// MaxWaiters bounds those of one pool: a caller beyond it is refused at
// once (Busy).
const maxTurns = lifecycle.MaxWaiters

// group is one group's queue of turns; the head is the turn under way.
type group struct {
	name  string
	mu    sync.Mutex
	queue []*turn
	// riders are the requests served without a turn of their own (with
	// the last head, or at once for the awake member), still being
	// served: the next head waits for them, so that no pool is parked
	// under a request (which would start it again).
	riders int
}

// turn is one request's place in its group's queue.
type turn struct {
	pool string
	// go is closed when the request may go on: as the head (swap), or
	// served with the head before it (its pool is now awake).
	go_  chan struct{}
	head bool
}

// groupOf returns the group of pool's entry and its members (sorted by
// id), or nil when it is in none.
func (m *Manager) groupOf(e *entry) (*group, []*entry) {
	if e.cfg == nil || e.cfg.Group == "" {
		return nil, nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.groups == nil {
		m.groups = map[string]*group{}
	}
	g := m.groups[e.cfg.Group]
	if g == nil {
		g = &group{name: e.cfg.Group}
		m.groups[e.cfg.Group] = g
	}
	var members []*entry
	for _, id := range m.ids() {
		if o := m.pools[id]; o.cfg != nil && o.cfg.Group == e.cfg.Group {
			members = append(members, o)
		}
	}
	return g, members
}

// awake says whether a pool holds or is about to hold its GPUs: an engine
// up or starting, a restart scheduled, a drain not done, an engine waking.
// An engine asleep (Sleep=vllm) is parked: its process keeps little of the
// GPU's memory (level 1 moves its weights to the host).
func awake(s supervisor.Snapshot) bool {
	switch s.State {
	case lifecycle.Starting, lifecycle.Warming, lifecycle.Ready, lifecycle.Draining, lifecycle.Backoff,
		lifecycle.Waking:
		return true
	case lifecycle.Sleeping:
		return false
	}
	return s.Live
}

// asleepPeers names the members of group but id whose engines sleep:
// parked asleep, their processes stay on the GPUs.
func (m *Manager) asleepPeers(id, group string) []string {
	m.mu.RLock()
	defer m.mu.RUnlock()
	var out []string
	for oid, o := range m.pools {
		if oid != id && o.cfg != nil && o.cfg.Group == group && o.pool.Snapshot().State == lifecycle.Sleeping {
			out = append(out, oid)
		}
	}
	return out
}

// parkWait bounds the wait for a park of pool p: its drain, then its
// engine's stop, or its sleep (bounded by StartTimeoutSec=, as a wake is).
func parkWait(p *config.Pool) time.Duration {
	d := p.GroupDrain + p.Engine.StopTimeout + time.Minute
	if p.Engine.Sleep == config.SleepVLLM {
		d += cmp.Or(p.Health.StartTimeout, sleep.DefaultTimeout)
	}
	return d
}

// inTurn runs serve on pool e in its group's turn (at once for a pool in
// no group, or the group's awake member with no turn under way). With
// settle, the turn is held until the pool is no longer starting (Start
// answers at once, but the next swap waits for its pool to be up).
func (m *Manager) inTurn(ctx context.Context, id string, e *entry, settle bool, serve func(Pool) error) error {
	g, members := m.groupOf(e)
	if g == nil {
		return serve(e.pool)
	}
	g.mu.Lock()
	if len(g.queue) == 0 && m.onlyAwake(e, members) {
		// A rider too: no swap parks the pool under it.
		g.riders++
		g.mu.Unlock()
		defer m.rideDone(g)
		return serve(e.pool)
	}
	if len(g.queue) >= maxTurns {
		g.mu.Unlock()
		return fmt.Errorf("pool %s: %d requests already wait for a turn of group %s, the most a group takes: %w",
			id, maxTurns, g.name, lifecycle.ErrBusy)
	}
	t := &turn{pool: id, go_: make(chan struct{})}
	g.queue = append(g.queue, t)
	g.next()
	g.mu.Unlock()

	select {
	case <-t.go_:
	case <-ctx.Done():
		g.mu.Lock()
		select {
		case <-t.go_:
			// Its turn came as the caller left: it is over at once.
			g.mu.Unlock()
			if t.head {
				m.endTurn(g, t, false)
			} else {
				m.rideDone(g)
			}
		default:
			g.queue = slices.DeleteFunc(g.queue, func(o *turn) bool { return o == t })
			g.mu.Unlock()
		}
		return fmt.Errorf("pool %s: waiting for its turn in group %s: %w", id, g.name, ctx.Err())
	}
	if !t.head {
		defer m.rideDone(g)
		return serve(e.pool)
	}
	start := time.Now()
	parked, err := m.parkOthers(g, e, members)
	if err != nil {
		m.endTurn(g, t, false)
		return err
	}
	err = serve(e.pool)
	done := func() {
		if len(parked) > 0 {
			m.swapped(g, id, parked, start, err)
		}
		m.endTurn(g, t, err == nil)
	}
	if settle && err == nil {
		go func() {
			wctx, cancel := context.WithTimeout(m.ctx, e.cfg.Health.StartTimeout+e.cfg.Health.WarmupTimeout)
			defer cancel()
			e.pool.Wait(wctx, func(s supervisor.Snapshot) bool {
				return s.State != lifecycle.Starting && s.State != lifecycle.Warming
			})
			done()
		}()
		return nil
	}
	done()
	return err
}

// onlyAwake: e is awake and no other member is.
func (m *Manager) onlyAwake(e *entry, members []*entry) bool {
	if !awake(e.pool.Snapshot()) {
		return false
	}
	for _, o := range members {
		if o != e && awake(o.pool.Snapshot()) {
			return false
		}
	}
	return true
}

// parkOthers parks every awake member but e, in id order, each with its
// own GroupDrainSec=, and returns their ids.
func (m *Manager) parkOthers(g *group, e *entry, members []*entry) ([]string, error) {
	var parked []string
	for _, o := range members {
		s := o.pool.Snapshot()
		if o != e && s.State == lifecycle.Sleeping {
			// Parked already, but its engine may still be moving its
			// weights off the GPU (its Sleep not yet answered): its park
			// answers once it sleeps. Not a swap.
			pctx, cancel := context.WithTimeout(m.ctx, parkWait(o.cfg))
			_, err := o.pool.Park(pctx, o.cfg.GroupDrain)
			cancel()
			if err != nil {
				return parked, fmt.Errorf("pool %s: pool %s of group %s did not sleep: %v: %w", e.cfg.ID, o.cfg.ID, g.name, err, lifecycle.ErrBusy)
			}
			continue
		}
		if o == e || !awake(s) {
			continue
		}
		id := o.cfg.ID
		m.o.Log.Info("pool parked for another pool of its group", journal.PoolID, id, journal.Group, g.name,
			journal.Reason, lifecycle.ReasonGroup)
		// The drain is bounded by its own deadline and the engine's stop;
		// the caller leaving does not cut it short.
		pctx, cancel := context.WithTimeout(m.ctx, parkWait(o.cfg))
		_, err := o.pool.Park(pctx, o.cfg.GroupDrain)
		cancel()
		if err != nil {
			m.o.Log.Error("cannot park the pool for another pool of its group", journal.PoolID, id, journal.Group, g.name, journal.Error, err.Error())
			return parked, fmt.Errorf("pool %s: cannot park pool %s of group %s first: %v: %w", e.cfg.ID, id, g.name, err, lifecycle.ErrBusy)
		}
		parked = append(parked, id)
	}
	return parked, nil
}

// swapped counts and journals a swap.
func (m *Manager) swapped(g *group, id string, parked []string, start time.Time, err error) {
	d := time.Since(start)
	if m.o.Metrics != nil {
		m.o.Metrics.GroupSwaps.WithLabelValues(g.name).Inc()
		m.o.Metrics.GroupSwapDuration.WithLabelValues(g.name).Observe(d.Seconds())
		m.o.Metrics.Touch()
	}
	if err != nil {
		m.o.Log.Warn("group swap: the pool asked for did not start", journal.PoolID, id, journal.Group, g.name,
			journal.Parked, strings.Join(parked, " "), journal.DurationSec, d.Seconds(), journal.Error, err.Error())
		return
	}
	m.o.Log.Info("group swap", journal.PoolID, id, journal.Group, g.name, journal.Parked, strings.Join(parked, " "),
		journal.DurationSec, d.Seconds())
}

// endTurn ends the head turn t. When its pool came up (woke), the turns
// queued for the same pool go with it; then the next turn is the head.
func (m *Manager) endTurn(g *group, t *turn, woke bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.queue = slices.DeleteFunc(g.queue, func(o *turn) bool { return o == t })
	if woke {
		g.queue = slices.DeleteFunc(g.queue, func(o *turn) bool {
			if o.pool == t.pool {
				g.riders++
				close(o.go_)
				return true
			}
			return false
		})
	}
	g.next()
}

// rideDone: a turn served with its head is done.
func (m *Manager) rideDone(g *group) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.riders--
	g.next()
}

// next lets the first turn go as the head once no rider is left.
func (g *group) next() {
	if g.riders > 0 || len(g.queue) == 0 || g.queue[0].head {
		return
	}
	g.queue[0].head = true
	close(g.queue[0].go_)
}

// startGroups is Adopt's rule for groups: one member up at a time. A
// member adopted awake (or the first adopted awake, if several were)
// stays up; with none, the first member (by id, the file name) that
// starts on its own starts. A member adopted asleep (its record said it
// was left asleep) is parked already: neither woken nor parked again. The
// others are parked (Idle, reason group), except those the operator
// stopped.
func (m *Manager) startGroups(adopted map[string]bool, starts func(id string, e *entry) bool) {
	byGroup := map[string][]string{}
	m.mu.RLock()
	for _, id := range m.ids() {
		if e := m.pools[id]; e.cfg != nil && e.cfg.Group != "" {
			byGroup[e.cfg.Group] = append(byGroup[e.cfg.Group], id)
		}
	}
	m.mu.RUnlock()
	for name, ids := range byGroup {
		asleep := map[string]bool{}
		up := ""
		for _, id := range ids {
			e, err := m.entry(id)
			if err != nil || !adopted[id] {
				continue
			}
			if e.pool.Snapshot().State == lifecycle.Sleeping {
				asleep[id] = true
			} else if up == "" {
				up = id
			}
		}
		for _, id := range ids {
			e, err := m.entry(id)
			if err != nil {
				continue
			}
			switch {
			case id == up, asleep[id]:
			case up == "" && !adopted[id] && starts(id, e):
				up = id
				go m.start(e)
			case m.stoppedByOperator(id) && !adopted[id]:
			default:
				m.o.Log.Info("pool parked: another pool of its group is up", journal.PoolID, id, journal.Group, name,
					journal.Reason, lifecycle.ReasonGroup)
				m.park(name, e)
			}
		}
	}
}

// entry returns a pool's entry.
func (m *Manager) entry(id string) (*entry, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	e, ok := m.pools[id]
	if !ok {
		return nil, fmt.Errorf("pool %q: %w", id, ErrNoSuchPool)
	}
	return e, nil
}

// park parks a member that is not to be up, without a turn: at daemon
// start or on a reload.
func (m *Manager) park(name string, e *entry) {
	ctx, cancel := context.WithTimeout(m.ctx, parkWait(e.cfg))
	defer cancel()
	if _, err := e.pool.Park(ctx, e.cfg.GroupDrain); err != nil {
		m.o.Log.Error("cannot park the pool for another pool of its group", journal.PoolID, e.cfg.ID, journal.Group, name, journal.Error, err.Error())
	}
}

// autoStart starts a pool a reload added or changed: a group member only
// in its group's turn, and only when no other member is up (a reload does
// not take the GPUs from the awake one); else it is parked.
func (m *Manager) autoStart(e *entry) {
	g, members := m.groupOf(e)
	if g == nil {
		m.start(e)
		return
	}
	for _, o := range members {
		if o != e && awake(o.pool.Snapshot()) {
			m.park(g.name, e)
			return
		}
	}
	err := m.inTurn(m.ctx, e.cfg.ID, e, true, func(p Pool) error { return p.Start() })
	if err != nil {
		m.o.Log.Error("pool did not start", journal.PoolID, e.cfg.ID, journal.Error, err.Error())
	}
}

// checkShared holds cfg's pools to the rule of shared GPUs on the
// inventory the daemon runs on: NVML relates a MIG device to its GPU,
// which the configuration alone cannot (config.CheckSharedGPUs).
func (m *Manager) checkShared(cfg *config.Config) error {
	inv := m.o.Inventory
	if inv == nil {
		return nil
	}
	errs := config.CheckSharedGPUs(cfg.Pools, func(d string) (config.GPUInfo, bool) {
		gs, err := inv.Resolve([]string{d})
		if err != nil || len(gs) != 1 {
			return config.GPUInfo{UUID: d}, false
		}
		return config.GPUInfo{UUID: gs[0].UUID, Parent: gs[0].Parent}, true
	})
	if len(errs) > 0 {
		return errs
	}
	return nil
}
