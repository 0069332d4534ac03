package lifecycle

import (
	"fmt"
	"log/slog"
	"time"

	"github.com/llorch/pool-managerd/internal/journal"
)

// Pools on demand: a Ready pool nobody uses for IdleStop has its engine
// stopped (Idle: no crash, no restart, its GPUs free); a lease
// (StartOnLease) or EnsureReady starts it again and is answered once it is
// Ready. Callers share one start.

// MaxWaiters bounds the callers waiting for one pool's start: beyond it a
// caller is refused at once (Busy), so that waiting costs no unbounded
// memory.
const MaxWaiters = 64

// DefaultWakeTimeout is how long a lease or an EnsureReady without a
// timeout waits for a start, unless Config says otherwise.
const DefaultWakeTimeout = 120 * time.Second

// MaxWakeTimeout bounds the timeout an EnsureReady may ask for.
const MaxWakeTimeout = time.Hour

// waiter is a caller waiting for the pool to be Ready: a lease to grant
// (lease != "") or an EnsureReady.
type waiter struct {
	req          ReqID
	lease, owner string
	until        time.Time
}

// used is a use of the pool (a lease taken or given back, a request in
// flight, its start): the idle timer starts over.
func (m *Machine) used() {
	if m.cfg.IdleStop <= 0 || m.state != Ready {
		return
	}
	m.arm(TimerIdle, m.now.Add(m.cfg.IdleStop))
}

// progressUse: requests in flight in the engine are use; an endpoint
// that cannot say keeps the engine up (its requests must not be cut).
func (m *Machine) progressUse(r *run, e Progress) {
	was := r.busy
	r.busy = e.Err != nil || e.InFlight > 0
	if r.busy || was {
		// The idle time runs from the last request seen.
		m.used()
	}
}

// idleDue: the idle timer ran out. A pool still in use (a lease, a
// request in flight) is not idle: the end of that use arms it again.
func (m *Machine) idleDue() {
	r := m.run
	if m.state != Ready || !m.ready() || m.drain != nil || m.reload != nil || len(m.waiters) > 0 {
		return
	}
	if len(m.leases) > 0 {
		return
	}
	if r.busy {
		m.used()
		return
	}
	if m.cfg.Sleep {
		m.sleepRun(r)
		return
	}
	r.stopping = StopIdle
	m.do(StopProbes{Run: r.id})
	m.stopScope(r.id)
	m.policy(m.tr.Stopped(m.now))
	m.transition(Idle, "unused")
	m.idleSince = m.now
	m.do(CountIdleStop{})
	m.log(slog.LevelInfo, "pool idle: engine stopped to give its GPUs back", journal.Reason, StopIdle.String(),
		journal.DurationSec, m.cfg.IdleStop.Seconds())
}

// idleEngineGone: an idle stop is over; callers that came meanwhile
// start the engine again.
func (m *Machine) idleEngineGone() {
	if m.state != Idle || len(m.waiters) == 0 || m.waking {
		return
	}
	if err := m.mayStart(); err != nil {
		// Its callers hear why.
		m.lastErr = err.Error()
		return
	}
	m.wake()
}

// leaseWaits handles a lease asked of an Idle pool (or of one starting
// for such a lease): with StartOnLease it waits for the start, else it is
// refused naming what brings the pool back. It says whether it answered
// (or queued) the request.
func (m *Machine) leaseWaits(e LeaseRequested) bool {
	joins := m.waking && (m.state == Starting || m.state == Warming || m.state == Waking)
	resting := m.state == Idle || (m.state == Sleeping && m.drain == nil)
	if !resting && !joins {
		return false
	}
	if !m.cfg.StartOnLease {
		if !resting {
			return false
		}
		m.reply(Reply{Req: e.Req, Err: fmt.Errorf("pool %s is %s (no StartOnLease=): EnsureReady or Start brings it back: %w",
			m.cfg.Pool, m.state, ErrNotReady)})
		return true
	}
	if m.owned[e.Owner] >= MaxLeasesPerOwner {
		return false
	}
	m.await(waiter{req: e.Req, lease: e.ID, owner: e.Owner}, 0)
	return true
}

// ensureReady answers once the pool is Ready, starting it where a Start
// would (the policy still decides).
func (m *Machine) ensureReady(e EnsureReadyRequested) {
	switch {
	case m.ready() && m.drain == nil:
		m.reply(Reply{Req: e.Req})
	case m.drain != nil:
		m.reply(Reply{Req: e.Req, Err: fmt.Errorf("pool %s is draining: %w", m.cfg.Pool, ErrDraining)})
	case m.reload != nil || m.rollback != nil:
		m.reply(Reply{Req: e.Req, Err: fmt.Errorf("pool %s is being reloaded: %w", m.cfg.Pool, ErrBusy)})
	default:
		m.await(waiter{req: e.Req}, e.Timeout)
	}
}

// await queues a caller until the pool is Ready, its start fails or
// timeout (0: WakeTimeout) passes, and starts the pool if nothing else
// is starting it.
func (m *Machine) await(w waiter, timeout time.Duration) {
	if len(m.waiters) >= MaxWaiters {
		m.reply(Reply{Req: w.req, Err: fmt.Errorf("pool %s: %d callers already wait for its start, the most a pool takes (MaxWaiters): %w",
			m.cfg.Pool, MaxWaiters, ErrBusy)})
		return
	}
	startable := !m.busy() && (m.state == Idle || m.state == Stopped || m.state == Failed || m.state == Backoff)
	sleeping := m.state == Sleeping && m.drain == nil && m.run != nil
	starting := m.state == Starting || m.state == Warming || m.state == Waking || (m.state == Idle && m.run != nil)
	if !startable && !starting && !sleeping {
		m.reply(Reply{Req: w.req, Err: fmt.Errorf("pool %s is %s: %w", m.cfg.Pool, m.state, ErrNotReady)})
		return
	}
	if startable {
		if err := m.mayStart(); err != nil {
			m.reply(Reply{Req: w.req, Err: err})
			return
		}
	}
	if timeout <= 0 {
		timeout = m.cfg.WakeTimeout
		if timeout <= 0 {
			timeout = DefaultWakeTimeout
		}
	}
	w.until = m.now.Add(min(timeout, MaxWakeTimeout))
	m.waiters = append(m.waiters, w)
	m.armWake()
	if startable {
		m.wake()
	}
	if sleeping {
		m.wakeSleeping()
	}
}

// wake starts the engine for the callers waiting.
func (m *Machine) wake() {
	idle := m.state == Idle
	m.waking = true
	m.cancelRestart()
	m.disarm(TimerRetry)
	m.do(CountLeaseStart{})
	m.log(slog.LevelInfo, "pool started on demand", journal.Reason, "demand")
	m.startEngine(false, 0)
	if m.start != nil {
		m.start.onDemand = idle
	}
}

// idleAgain: an idle pool's start on demand found its GPUs, their memory
// or its port held by another process. No crash, no retry: the callers
// waiting are told who holds them, and the pool is idle again, its next
// use trying anew.
func (m *Machine) idleAgain(why string) {
	m.waking = false
	m.disarm(TimerRetry)
	m.next = time.Time{}
	m.transition(Idle, "start on demand held by another process")
	m.idleSince = m.now
	m.log(slog.LevelWarn, "pool idle again: "+why, journal.Reason, "demand")
}

// armWake arms the timer of the first waiter to give up.
func (m *Machine) armWake() {
	if len(m.waiters) == 0 {
		m.disarm(TimerWake)
		return
	}
	first := m.waiters[0].until
	for _, w := range m.waiters[1:] {
		if w.until.Before(first) {
			first = w.until
		}
	}
	m.arm(TimerWake, first)
}

// wakeDue answers NotReady to the callers whose wait is over; the start
// goes on for the others (and for the next caller).
func (m *Machine) wakeDue() {
	kept := m.waiters[:0]
	var late []waiter
	for _, w := range m.waiters {
		if !w.until.After(m.now) {
			late = append(late, w)
		} else {
			kept = append(kept, w)
		}
	}
	m.waiters = kept
	for _, w := range late {
		m.reply(Reply{Req: w.req, Err: fmt.Errorf("pool %s not ready within its wait (it is %s): %w", m.cfg.Pool, m.state, ErrNotReady)})
	}
	m.armWake()
}

// ownerWaitersGone drops the lease waits of an owner that left.
func (m *Machine) ownerWaitersGone(owner string) {
	kept := m.waiters[:0]
	var gone []waiter
	for _, w := range m.waiters {
		if w.lease != "" && w.owner == owner {
			gone = append(gone, w)
		} else {
			kept = append(kept, w)
		}
	}
	if len(gone) == 0 {
		return
	}
	m.waiters = kept
	for _, w := range gone {
		m.reply(Reply{Req: w.req, Err: fmt.Errorf("pool %s: %s left before the pool was ready: %w", m.cfg.Pool, owner, ErrNotReady)})
	}
	m.armWake()
}

// settleWaiters answers the waiting callers once the pool is Ready (a
// lease is granted as AcquireLease would), or has failed to start; while
// it is starting (or its idle stop still ends) they wait.
func (m *Machine) settleWaiters() {
	if len(m.waiters) == 0 {
		if m.waking && m.state != Starting && m.state != Warming && m.state != Waking {
			m.waking = false
		}
		return
	}
	ws := m.waiters
	switch {
	case m.ready() && m.drain == nil:
		m.waiters, m.waking = nil, false
		m.disarm(TimerWake)
		granted := false
		for _, w := range ws {
			if w.lease == "" {
				m.reply(Reply{Req: w.req})
				continue
			}
			if m.cfg.Slots > 0 && uint32(len(m.leases)) >= m.cfg.Slots {
				m.reply(Reply{Req: w.req, Err: fmt.Errorf("pool %s has all %d slots leased: %w", m.cfg.Pool, m.cfg.Slots, ErrNoCapacity)})
				continue
			}
			if m.owned[w.owner] >= MaxLeasesPerOwner {
				m.reply(Reply{Req: w.req, Err: fmt.Errorf("pool %s: %s holds %d leases, the most one bus connection may hold on a pool (MaxLeasesPerOwner): %w",
					m.cfg.Pool, w.owner, MaxLeasesPerOwner, ErrNoCapacity)})
				continue
			}
			m.addLease(w.lease, w.owner)
			granted = true
			m.do(LeasesChanged{})
			m.reply(Reply{Req: w.req, Lease: w.lease})
		}
		if granted {
			m.used()
		}
	case (m.state == Starting || m.state == Warming) && m.drain == nil && m.reload == nil:
	case m.state == Idle && (m.run != nil || m.waking):
	case (m.state == Sleeping || m.state == Waking) && m.run != nil && m.drain == nil:
	default:
		m.waiters, m.waking = nil, false
		m.disarm(TimerWake)
		why := m.lastErr
		if why == "" {
			why = "no engine"
		}
		// A start refused for want of GPU memory says so by its name:
		// the caller learns who holds the memory and may come back.
		notReady := ErrNotReady
		if m.noMemory {
			notReady = ErrNoGPUMemory
		}
		for _, w := range ws {
			m.reply(Reply{Req: w.req, Err: fmt.Errorf("pool %s did not start (it is %s: %s): %w", m.cfg.Pool, m.state, why, notReady)})
		}
	}
}

// idleRestored makes a stopped pool that was idle before a daemon
// restart idle again, as systemd keeps a unit's state across its own
// re-execution: its first use starts it.
func (m *Machine) idleRestored(e IdleRestored) {
	if m.state != Stopped || m.busy() || m.cfg.IdleStop <= 0 || m.held != "" || len(m.gpuHeld) > 0 {
		return
	}
	m.transition(Idle, "idle before the daemon restarted")
	m.idleSince = e.Since
	if e.Since.IsZero() || e.Since.After(m.now) {
		m.idleSince = m.now
	}
}
