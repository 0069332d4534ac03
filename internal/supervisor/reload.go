package supervisor

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/llorch/pool-managerd/internal/engine"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/model"
)

// Reload errors a caller can match with errors.Is.
var (
	ErrInvalidArgument = errors.New("invalid argument")
	ErrDrainTimeout    = errors.New("drain timeout")
	ErrReloadFailed    = errors.New("reload failed")
)

type reloadOp struct {
	ref    string
	digest string
	prev   model.Staged
	// old is the engine running when the reload began (nil if none).
	old        *run
	drained    chan error
	oldStopped chan struct{}
	// result is nil when the new engine is healthy, or why it is not.
	result chan error
}

// Reload swaps the pool's model atomically: the ref is validated first
// (a bad one changes nothing), the pool drained, the model staged, the old
// engine stopped and the new one started and awaited; if the new engine
// does not become healthy it is killed and the old model restored and
// awaited, and the error says it rolled back and why. The same model as
// running is a success that restarts nothing.
func (s *Supervisor) Reload(ctx context.Context, ref string, drainDeadline time.Duration) (string, error) {
	start := time.Now()
	fail := func(reason string, err error) (string, error) {
		s.metrics.ReloadFailure.WithLabelValues(s.cfg.Pool, reason).Inc()
		s.metrics.ReloadDuration.WithLabelValues(s.cfg.Pool, "failure").Observe(time.Since(start).Seconds())
		return "", err
	}
	prevRef := s.Snapshot().Model
	// A bad ref (*model.RefError) is the caller's; anything else (the
	// engine's user unknown, a read error) is the host's.
	refFail := func(err error) (string, error) {
		var re *model.RefError
		if errors.As(err, &re) {
			return fail("invalid_model", fmt.Errorf("%w: %v", ErrInvalidArgument, err))
		}
		return fail("stage", fmt.Errorf("%w: %v (nothing changed)", ErrReloadFailed, err))
	}
	src, err := s.cfg.Stager.Resolve(ref)
	if err != nil {
		return refFail(err)
	}
	digest, err := s.cfg.Stager.Digest(src)
	if err != nil {
		return refFail(err)
	}
	op := &reloadOp{ref: ref, digest: digest, drained: make(chan error, 1), oldStopped: make(chan struct{}), result: make(chan error, 1)}
	same := false
	err = s.call(func() error {
		switch {
		case s.reload != nil:
			return fmt.Errorf("pool %s is already being reloaded: %w", s.cfg.Pool, ErrBusy)
		case s.drain != nil:
			return fmt.Errorf("pool %s is draining: %w", s.cfg.Pool, ErrBusy)
		case s.snap.State == Backoff || s.snap.State == Starting || s.pending != nil:
			return fmt.Errorf("pool %s is restarting (%s): %w", s.cfg.Pool, s.snap.State, ErrBusy)
		case s.run != nil && s.run.healthy && s.current.Digest == digest:
			same = true
			return nil
		case s.run == nil:
			// The new engine is a start like any other: no way around
			// the breaker.
			if err := s.mayStart(); err != nil {
				return err
			}
		}
		s.reload = op
		op.prev, op.old = s.current, s.run
		if s.run == nil {
			close(op.oldStopped)
			op.drained <- nil
			return nil
		}
		d := &drainOp{start: time.Now(), reload: op}
		s.drain = d
		s.update(func(p *Snapshot) { p.State, p.Ready = Draining, false })
		s.awaitLeases(d, drainDeadline)
		return nil
	})
	if err != nil {
		return "", err
	}
	if same {
		s.log.Info("reload: the model is already running, nothing restarted", journal.PoolID, s.cfg.Pool, journal.Model, ref)
		s.metrics.ReloadSuccess.WithLabelValues(s.cfg.Pool).Inc()
		s.metrics.ReloadDuration.WithLabelValues(s.cfg.Pool, "success").Observe(time.Since(start).Seconds())
		return ref, nil
	}
	if err := <-op.drained; err != nil {
		s.post(func() { s.reload = nil })
		return fail("drain_timeout", err)
	}
	staged, err := s.cfg.Stager.Stage(ref, digest)
	if err != nil {
		s.call(func() error {
			s.reload, s.drain = nil, nil
			if s.run != nil && s.run.healthy {
				s.update(func(p *Snapshot) { p.State, p.Ready = Ready, true })
			}
			return nil
		})
		return fail("stage", fmt.Errorf("%w: staging %s: %v (nothing changed)", ErrReloadFailed, ref, err))
	}
	s.post(func() { s.stopRun("reload") })
	<-op.oldStopped

	err = s.callThen(func() error { s.current = staged; return nil },
		func(done func(error)) { s.startEngine(true, done) })
	if err == nil {
		err = <-op.result
	}
	if err == nil {
		s.call(func() error {
			s.reload, s.drain = nil, nil
			r := s.run
			r.candidate = false
			now := time.Now()
			s.emit(s.tracker.Healthy(now))
			s.update(func(p *Snapshot) {
				// LastError stays: it is the last error, not the current one.
				p.State, p.Ready, p.ReadyAt, p.LastHeartbeat = Ready, true, now, now
				p.Model, p.ModelDigest, p.StagedPath = ref, staged.Digest, staged.Path
			})
			s.writeRecord(r)
			return nil
		})
		s.metrics.ReloadSuccess.WithLabelValues(s.cfg.Pool).Inc()
		s.metrics.ReloadDuration.WithLabelValues(s.cfg.Pool, "success").Observe(time.Since(start).Seconds())
		s.log.Info("reload done: now serving "+ref, journal.MessageIDField, string(journal.MsgReloadDone), journal.PoolID, s.cfg.Pool,
			journal.Model, ref, "MODEL_DIGEST", staged.Digest, journal.EngineVersion, s.Snapshot().EngineVersion)
		return ref, nil
	}

	// Roll back: the new engine goes, the old model comes back.
	why := err
	reason := "crash"
	var re *reloadError
	if errors.As(err, &re) {
		reason = re.reason
	}
	s.rollback(op)
	back, werr := s.Wait(ctx, func(p Snapshot) bool { return p.Ready || p.State == Failed || p.State == Backoff })
	msg := fmt.Sprintf("rolled back to %s: %v", prevRef, why)
	if werr != nil || !back.Ready {
		msg += fmt.Sprintf("; the old model is not serving again yet (%s)", back.LastError)
	}
	s.log.Error("reload of "+ref+" "+msg, journal.MessageIDField, string(journal.MsgReloadRolledBack),
		journal.PoolID, s.cfg.Pool, journal.Model, prevRef, "REASON", reason)
	return fail(reason, fmt.Errorf("%w: %s", ErrReloadFailed, msg))
}

// reloadError says why a new engine failed, with the metric reason.
type reloadError struct {
	reason string
	msg    string
}

func (e *reloadError) Error() string { return e.msg }

// rollback kills the new engine if it still runs and starts the previous
// model as a normal engine.
func (s *Supervisor) rollback(op *reloadOp) {
	var cand *run
	s.call(func() error {
		cand = s.run
		if cand != nil {
			s.stopRun("reload")
		}
		return nil
	})
	if cand != nil {
		<-cand.exited
	}
	s.call(func() error {
		s.reload, s.drain = nil, nil
		s.current = op.prev
		if op.old == nil {
			s.update(func(p *Snapshot) { p.State = Stopped })
			return nil
		}
		s.startEngine(false, s.startFailed)
		return nil
	})
}

func (s *Supervisor) reloadCandidateHealthy(r *run) {
	select {
	case s.reload.result <- nil:
	default:
	}
}

func (s *Supervisor) reloadCandidateExited(r *run, x *engine.Exit) {
	if s.reload == nil {
		return
	}
	reason, how := "crash", describe("", r, x)
	switch r.stopping {
	case "health":
		reason, how = "health", describe("health_check", r, x)
	case "start":
		reason, how = "start_timeout", describe("start_failure", r, x)
	case "reload":
		// Stopped by the rollback itself: the reason was already given.
		return
	}
	select {
	case s.reload.result <- &reloadError{reason: reason, msg: "the new engine " + how}:
	default:
	}
}
