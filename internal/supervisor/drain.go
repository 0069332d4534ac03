package supervisor

import (
	"context"
	"fmt"
	"time"

	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/witness"
)

// Drain outcomes.
const (
	Drained = "drained"
	Forced  = "forced"
)

// DrainResult is how a drain ended.
type DrainResult struct {
	Outcome string
	// Revoked counts leases revoked at the deadline (or with a crash).
	Revoked int
	// LeasesDrainedAt is when the last lease was released (or the drain
	// began with none); zero when leases were revoked.
	LeasesDrainedAt time.Time
	// Done is when the engine was gone.
	Done time.Time
}

type drainOp struct {
	start      time.Time
	deadline   *time.Timer
	deadlineAt time.Time
	waiters    []chan DrainResult
	res        DrainResult
	// reload is set when the drain is a reload's first step: its deadline
	// aborts the reload instead of forcing the stop.
	reload *reloadOp
}

// Drain stops new leases at once (Draining, not Ready), waits until the
// last lease is released or the deadline passes (then revokes them), stops
// the engine and returns the outcome. A drain of a stopped pool is drained
// at once; concurrent drains share one outcome. ctx only bounds the wait.
func (s *Supervisor) Drain(ctx context.Context, deadline time.Duration) (DrainResult, error) {
	ch := make(chan DrainResult, 1)
	if err := s.call(func() error { return s.beginDrain(deadline, ch) }); err != nil {
		return DrainResult{}, err
	}
	select {
	case r := <-ch:
		return r, nil
	case <-ctx.Done():
		return DrainResult{}, ctx.Err()
	}
}

func (s *Supervisor) beginDrain(deadline time.Duration, ch chan DrainResult) error {
	if d := s.drain; d != nil && d.reload == nil {
		// One drain, one outcome; a later, shorter deadline (Stop during
		// a drain) tightens it.
		d.waiters = append(d.waiters, ch)
		if at := time.Now().Add(deadline); d.deadline != nil && at.Before(d.deadlineAt) && d.res.LeasesDrainedAt.IsZero() {
			d.deadline.Stop()
			s.armDeadline(d, deadline)
		}
		return nil
	}
	if s.reload != nil {
		return fmt.Errorf("pool %s is being reloaded: %w", s.cfg.Pool, ErrBusy)
	}
	if s.pending != nil {
		s.settleExit(witness.NoCause)
	}
	now := time.Now()
	// No restart sneaks in during or after a drain.
	s.cancelRestart()
	s.cancelStart("the pool is being drained")
	s.emit(s.tracker.Stopped(now))
	if s.run == nil {
		s.update(func(p *Snapshot) { p.State, p.Ready, p.NextRestart = Stopped, false, time.Time{} })
		res := DrainResult{Outcome: Drained, LeasesDrainedAt: now, Done: now}
		s.drainDone(now, res)
		ch <- res
		return nil
	}
	d := &drainOp{start: now, waiters: []chan DrainResult{ch}}
	s.drain = d
	s.update(func(p *Snapshot) { p.State, p.Ready, p.NextRestart = Draining, false, time.Time{} })
	s.awaitLeases(d, deadline)
	return nil
}

// awaitLeases finishes the lease phase of a drain now if no lease is held,
// else when the last one is released or at the deadline.
func (s *Supervisor) awaitLeases(d *drainOp, deadline time.Duration) {
	n := len(s.leases)
	if n == 0 {
		s.leasesDrained(d)
		return
	}
	s.log.Warn(fmt.Sprintf("draining with %d active lease(s) in flight", n), journal.PoolID, s.cfg.Pool, journal.ActiveLeases, n)
	s.armDeadline(d, deadline)
}

func (s *Supervisor) armDeadline(d *drainOp, deadline time.Duration) {
	d.deadlineAt = time.Now().Add(deadline)
	var t *time.Timer
	t = time.AfterFunc(deadline, func() {
		s.post(func() {
			if s.drain == d && d.deadline == t && d.res.LeasesDrainedAt.IsZero() {
				s.drainDeadline(d)
			}
		})
	})
	d.deadline = t
}

// leaseReleased completes a drain's lease phase the instant the last
// lease goes: no polling.
func (s *Supervisor) leaseReleased() {
	if d := s.drain; d != nil && len(s.leases) == 0 && d.res.LeasesDrainedAt.IsZero() && d.res.Outcome != Forced {
		s.leasesDrained(d)
	}
}

func (s *Supervisor) leasesDrained(d *drainOp) {
	d.res.LeasesDrainedAt = time.Now()
	if d.deadline != nil {
		d.deadline.Stop()
	}
	if d.reload != nil {
		d.reload.drained <- nil
		return
	}
	if s.run == nil {
		s.finishDrain()
		return
	}
	s.stopRun("drain")
}

func (s *Supervisor) drainDeadline(d *drainOp) {
	if d.reload != nil {
		// A reload does not force anything: it gives up, and the pool
		// goes on serving on its old engine.
		s.drain = nil
		s.update(func(p *Snapshot) {
			if s.run != nil && s.run.healthy {
				p.State, p.Ready = Ready, true
			}
		})
		d.reload.drained <- fmt.Errorf("pool %s: leases still held at the drain deadline: %w", s.cfg.Pool, ErrDrainTimeout)
		return
	}
	d.res.Outcome = Forced
	s.metrics.DrainForceStops.WithLabelValues(s.cfg.Pool).Inc()
	s.revokeLeases("drain deadline passed")
	if s.run == nil {
		s.finishDrain()
		return
	}
	s.stopRun("drain")
}

// engineStopped is told of every engine exit.
func (s *Supervisor) engineStopped(r *run) {
	if s.drain != nil && s.drain.reload == nil {
		s.finishDrain()
	}
	if s.reload != nil && r == s.reload.old {
		close(s.reload.oldStopped)
	}
}

func (s *Supervisor) finishDrain() {
	d := s.drain
	s.drain = nil
	now := time.Now()
	if d.res.Outcome == "" {
		d.res.Outcome = Drained
	}
	d.res.Done = now
	s.update(func(p *Snapshot) { p.State, p.Ready, p.Live = Stopped, false, s.run != nil })
	// Counted before the callers hear of it, journaled after.
	s.drainCounted(d.start, d.res)
	for _, w := range d.waiters {
		w <- d.res
	}
	s.drainLogged(d.start, d.res)
}

func (s *Supervisor) drainDone(start time.Time, res DrainResult) {
	s.drainCounted(start, res)
	s.drainLogged(start, res)
}

func (s *Supervisor) drainCounted(start time.Time, res DrainResult) {
	s.metrics.Drains.WithLabelValues(s.cfg.Pool, res.Outcome).Inc()
	s.metrics.DrainDuration.WithLabelValues(s.cfg.Pool, res.Outcome).Observe(res.Done.Sub(start).Seconds())
}

func (s *Supervisor) drainLogged(start time.Time, res DrainResult) {
	var stop int64
	if !res.LeasesDrainedAt.IsZero() {
		stop = res.Done.Sub(res.LeasesDrainedAt).Microseconds()
	}
	s.log.Info("drain "+res.Outcome, journal.MessageIDField, string(journal.MsgDrainDone), journal.PoolID, s.cfg.Pool,
		"OUTCOME", res.Outcome, "REVOKED_LEASES", res.Revoked, "DURATION_SEC", res.Done.Sub(start).Seconds(),
		"ENGINE_STOP_USEC", stop)
}
