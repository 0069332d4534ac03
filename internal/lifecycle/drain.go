package lifecycle

import (
	"fmt"
	"log/slog"
	"time"

	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/witness"
)

// drainOp is a drain from its request until its engine is gone, or a
// reload's first step (then it lasts as long as the reload).
type drainOp struct {
	phase drainPhase
	start time.Time
	// held is how many leases were held when it began.
	held int
	// deadline is the drain's own, from its start; deadlineAt is when
	// its timer is armed for.
	deadline   time.Duration
	deadlineAt time.Time
	waiters    []ReqID
	res        DrainResult
	// reload is set when the drain is a reload's first step: its deadline
	// aborts the reload instead of forcing the stop.
	reload *reloadOp
	// waitedRequests: the engine's requests in flight were journaled.
	waitedRequests bool
	// park: the drain parks the pool (see ParkRequested): it ends Idle.
	park bool
	// engineGone: the engine exited; the drain ends once no stop of
	// its scope is out (see stopScope).
	engineGone bool
}

// drainRequested stops new leases at once (Draining, not Ready), waits
// until the last lease is released or the deadline passes (then revokes
// them), stops the engine and answers with the outcome. A drain of a
// stopped pool is drained at once; concurrent drains share one outcome.
func (m *Machine) drainRequested(e DrainRequested) {
	if d := m.drain; d != nil && d.reload == nil {
		// One drain, one outcome; a later, shorter deadline (Stop during
		// a drain) tightens it.
		d.waiters = append(d.waiters, e.Req)
		if !m.parking && d.park {
			// An operator's drain during a park: the pool ends stopped,
			// its engine stopped, not asleep.
			d.park = false
			if d.phase == drainSleeping {
				m.drainTo(d, drainStopping)
				m.stopRun(StopDrain)
			}
		}
		if at := m.now.Add(e.Deadline); m.timers.armed[TimerDrainDeadline] && at.Before(d.deadlineAt) && (d.phase == drainLeases || d.phase == drainRequests) {
			m.armDeadline(d, e.Deadline)
		}
		return
	}
	if m.reload != nil || m.rollback != nil {
		m.reply(Reply{Req: e.Req, Err: fmt.Errorf("pool %s is being reloaded: %w", m.cfg.Pool, ErrBusy)})
		return
	}
	if m.pending != nil {
		m.settleExit(witness.NoCause)
	}
	// No restart sneaks in during or after a drain.
	m.cancelRestart()
	m.disarm(TimerRetry)
	m.cancelStart("the pool is being drained")
	m.policy(m.tr.Stopped(m.now))
	m.next = time.Time{}
	if m.run == nil {
		m.drainedTo(m.parking)
		res := DrainResult{Outcome: Drained, LeasesDrainedAt: m.now, Done: m.now}
		m.do(CountDrain{Start: m.now, Result: res})
		m.reply(Reply{Req: e.Req, Drain: res})
		m.drainLogged(m.now, res)
		return
	}
	d := &drainOp{start: m.now, waiters: []ReqID{e.Req}, held: len(m.leases), deadline: e.Deadline, park: m.parking}
	m.drain = d
	m.transition(Draining, "drain")
	m.awaitLeases(d, e.Deadline)
}

// awaitLeases finishes the lease phase of a drain now if no lease is held,
// else when the last one is released or at the deadline.
func (m *Machine) awaitLeases(d *drainOp, deadline time.Duration) {
	n := len(m.leases)
	if n == 0 {
		m.leasesDrained(d)
		return
	}
	m.log(slog.LevelWarn, fmt.Sprintf("draining with %d active lease(s) in flight", n), journal.ActiveLeases, n)
	m.armDeadline(d, deadline)
}

func (m *Machine) armDeadline(d *drainOp, deadline time.Duration) {
	d.deadlineAt = m.now.Add(deadline)
	m.arm(TimerDrainDeadline, d.deadlineAt)
}

func (m *Machine) leasesDrained(d *drainOp) {
	d.res.LeasesDrainedAt = m.now
	if m.awaitRequests(d) {
		return
	}
	m.requestsDrained(d)
}

// awaitRequests begins the requests phase of a drain whose leases are
// gone, where the engine tells its own requests in flight: the drain
// goes on when a fresh read of its metrics says none is left (or cannot
// say), or at the deadline.
func (m *Machine) awaitRequests(d *drainOp) bool {
	r := m.run
	at := d.start.Add(d.deadline)
	if !m.cfg.DrainRequests || r == nil || r.stopping != NotStopping || !r.healthy || !at.After(m.now) {
		return false
	}
	m.drainTo(d, drainRequests)
	if !m.timers.armed[TimerDrainDeadline] {
		d.deadlineAt = at
		m.arm(TimerDrainDeadline, at)
	}
	m.do(ReadProgress{Run: r.id})
	return true
}

// drainProgress: what the engine's metrics say during the requests
// phase. An answer that is not a number of requests ends the wait: the
// drain cannot know more.
func (m *Machine) drainProgress(d *drainOp, e Progress) {
	if e.Err == nil && e.InFlight > 0 {
		if !d.waitedRequests {
			d.waitedRequests = true
			m.log(slog.LevelInfo, fmt.Sprintf("drain: %g request(s) in flight in the engine, holding no lease: waiting for them", e.InFlight),
				journal.InFlight, e.InFlight)
		}
		return
	}
	m.requestsDrained(d)
}

// requestsDrained goes on with a drain whose leases, and the engine's own
// requests where it tells them, are gone.
func (m *Machine) requestsDrained(d *drainOp) {
	m.disarm(TimerDrainDeadline)
	if d.reload != nil {
		m.drainTo(d, drainReloading)
		m.reloadDrained()
		return
	}
	m.stopDrained(d)
}

// stopDrained stops the engine of a drain whose leases are gone; the
// engine's exit ends the drain.
func (m *Machine) stopDrained(d *drainOp) {
	if d.park && m.sleepParked(d) {
		return
	}
	m.drainTo(d, drainStopping)
	switch {
	case m.run != nil:
		m.stopRun(StopDrain)
	case m.pending != nil:
		// It exited on its own, its exit held for systemd's word: that
		// exit, once settled, ends the drain (and no restart follows).
	default:
		m.drainEngineGone()
	}
}

// drainEngineGone: the drain's engine is gone; the drain ends now, or
// when the last stop of its scope ends (scopeStopped). An exit that
// already moved the pool on (an operator's systemctl stop, a crash) ends
// it now: that scope ends on its own.
func (m *Machine) drainEngineGone() {
	m.drain.engineGone = true
	if len(m.scopeStops) == 0 || m.state != Draining {
		m.finishDrain()
	}
}

func (m *Machine) drainDeadline(d *drainOp) {
	if d.phase == drainRequests {
		m.log(slog.LevelWarn, "drain deadline passed with requests still in flight in the engine")
		if d.reload != nil {
			m.reloadAborted("drain_timeout", fmt.Errorf("pool %s: requests still in flight in the engine at the drain deadline: %w", m.cfg.Pool, ErrDrainTimeout))
			return
		}
		d.res.Outcome = Forced
		m.do(CountForcedDrain{})
		m.stopDrained(d)
		return
	}
	if d.reload != nil {
		// A reload does not force anything: it gives up, and the pool
		// goes on serving on its old engine.
		m.reloadAborted("drain_timeout", fmt.Errorf("pool %s: leases still held at the drain deadline: %w", m.cfg.Pool, ErrDrainTimeout))
		return
	}
	d.res.Outcome = Forced
	m.do(CountForcedDrain{})
	m.revokeLeases("drain deadline passed")
	m.stopDrained(d)
}

func (m *Machine) finishDrain() {
	d := m.drain
	m.drain = nil
	if d.res.Outcome == "" {
		d.res.Outcome = Drained
	}
	d.res.Done = m.now
	if d.phase == drainSleeping && m.run != nil && m.run.sleep.asleep {
		m.parkedAsleep()
	} else {
		m.drainedTo(d.park)
	}
	// Counted before the callers hear of it, journaled after.
	m.do(CountDrain{Start: d.start, Result: d.res})
	for _, w := range d.waiters {
		m.reply(Reply{Req: w, Drain: d.res})
	}
	m.drainLogged(d.start, d.res)
}

func (m *Machine) drainLogged(start time.Time, res DrainResult) {
	var stop int64
	if !res.LeasesDrainedAt.IsZero() {
		stop = res.Done.Sub(res.LeasesDrainedAt).Microseconds()
	}
	m.log(slog.LevelInfo, "drain "+res.Outcome, journal.MessageIDField, string(journal.MsgDrainDone),
		journal.Outcome, res.Outcome, journal.RevokedLeases, res.Revoked, journal.DurationSec, res.Done.Sub(start).Seconds(),
		journal.EngineStopUsec, stop)
}

// ---- leases

func (m *Machine) leaseRequested(e LeaseRequested) {
	if m.leaseWaits(e) {
		return
	}
	var err error
	switch {
	case m.drain != nil:
		err = fmt.Errorf("pool %s is draining: %w", m.cfg.Pool, ErrDraining)
	case !m.ready():
		err = fmt.Errorf("pool %s is %s: %w", m.cfg.Pool, m.state, ErrNotReady)
	case m.cfg.Slots > 0 && uint32(len(m.leases)) >= m.cfg.Slots:
		err = fmt.Errorf("pool %s has all %d slots leased: %w", m.cfg.Pool, m.cfg.Slots, ErrNoCapacity)
	case m.owned[e.Owner] >= MaxLeasesPerOwner:
		err = fmt.Errorf("pool %s: %s holds %d leases, the most one bus connection may hold on a pool (MaxLeasesPerOwner): %w",
			m.cfg.Pool, e.Owner, MaxLeasesPerOwner, ErrNoCapacity)
	}
	if err != nil {
		m.reply(Reply{Req: e.Req, Err: err})
		return
	}
	m.addLease(e.ID, e.Owner)
	m.do(LeasesChanged{})
	m.reply(Reply{Req: e.Req, Lease: e.ID})
	m.used()
}

func (m *Machine) leaseReleased(e LeaseReleased) {
	o, ok := m.leases[e.ID]
	switch {
	case !ok:
		m.reply(Reply{Req: e.Req, Err: fmt.Errorf("lease %q: %w", e.ID, ErrNoSuchLease)})
		return
	case e.CheckOwner && o != e.Owner:
		m.reply(Reply{Req: e.Req, Err: fmt.Errorf("lease %q: %w", e.ID, ErrNotOwner)})
		return
	}
	m.dropLease(e.ID, o)
	m.do(LeasesChanged{})
	m.reply(Reply{Req: e.Req})
	m.used()
	m.lastLeaseGone()
}

func (m *Machine) ownerGone(e OwnerGone) {
	n := 0
	for id, o := range m.leases {
		if o == e.Owner {
			m.dropLease(id, o)
			n++
		}
	}
	if n > 0 {
		m.do(LeasesChanged{})
		m.used()
	}
	m.ownerWaitersGone(e.Owner)
	m.reply(Reply{Req: e.Req, N: n})
	if n > 0 {
		m.lastLeaseGone()
	}
}

// MaxLeasesPerOwner caps the leases one owner (a bus connection) holds on
// a pool, whatever Slots says: with no slot cap, each lease costs memory
// and a rewrite of the runtime record, and a caller must not make that
// unbounded.
const MaxLeasesPerOwner = 64

func (m *Machine) addLease(id, owner string) {
	if _, ok := m.leases[id]; !ok {
		m.owned[owner]++
	}
	m.leases[id] = owner
}

func (m *Machine) dropLease(id, owner string) {
	delete(m.leases, id)
	if m.owned[owner]--; m.owned[owner] <= 0 {
		delete(m.owned, owner)
	}
}

// lastLeaseGone completes a drain's lease phase the instant the last
// lease goes: no polling.
func (m *Machine) lastLeaseGone() {
	if d := m.drain; d != nil && len(m.leases) == 0 && d.phase == drainLeases && d.res.Outcome != Forced {
		m.leasesDrained(d)
	}
}

// revokeLeases drops every lease (the engine is gone or a drain's
// deadline passed).
func (m *Machine) revokeLeases(why string) {
	n := len(m.leases)
	if n == 0 {
		return
	}
	clear(m.leases)
	clear(m.owned)
	if m.drain != nil {
		m.drain.res.Revoked += n
		m.drain.res.Outcome = Forced
	}
	m.log(slog.LevelWarn, fmt.Sprintf("%d lease(s) revoked: %s", n, why), journal.ActiveLeases, n)
}
