package lifecycle

import (
	"fmt"
	"log/slog"

	"github.com/llorch/pool-managerd/internal/crash"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/model"
)

// reloadOp is a reload from its request until its new engine is healthy
// or it rolls back.
type reloadOp struct {
	phase       reloadPhase
	req         ReqID
	ref, digest string
	prev        model.Staged
	// old is the engine running when the reload began (nil if none);
	// oldGone once it is (it may go on its own in any phase before
	// reloadStarting).
	old     *run
	oldGone bool
	// stageRun names the staging of the new model (reloadStaging);
	// staged is it, once staged.
	stageRun RunID
	staged   *model.Staged
	// why the new engine failed, and its metric label (reloadRollingBack).
	why, reason string
	// asleep: the old engine was asleep (Sleeping) when the reload
	// began: a reload given up leaves it asleep.
	asleep bool
}

// rollbackWait is a rolled-back reload waiting to hear whether the old
// model serves again before it answers.
type rollbackWait struct {
	req                  ReqID
	why, reason, prevRef string
	hadOld               bool
}

// reloadRequested swaps the pool's model: drain, stage, stop the old
// engine, start the new one and await its health; if it fails, it goes
// and the old model comes back. The same model as running is a success
// that restarts nothing.
func (m *Machine) reloadRequested(e ReloadRequested) {
	// Its model's hash is over (it came with the request).
	m.frac.hashing = false
	busy := func(format string, a ...any) {
		m.reply(Reply{Req: e.Req, Err: fmt.Errorf("pool %s "+format+": %w", append(append([]any{m.cfg.Pool}, a...), ErrBusy)...)})
	}
	switch {
	case m.reload != nil || m.rollback != nil:
		busy("is already being reloaded")
		return
	case m.drain != nil:
		busy("is draining")
		return
	case m.state == Backoff || m.state == Starting || m.state == Warming || m.pending != nil || m.start != nil:
		busy("is restarting (%s)", m.state)
		return
	case m.state == Waking:
		busy("is waking")
		return
	case m.state == Idle:
		// Nothing to stop and nothing to start: its next start loads
		// the new model.
		m.idleReload(e)
		return
	case m.run != nil && m.run.healthy && m.current.Digest == e.Digest:
		m.log(slog.LevelInfo, "reload: the model is already running, nothing restarted", journal.Model, e.Ref)
		m.reply(Reply{Req: e.Req, Same: true})
		return
	case m.run == nil:
		// The new engine is a start like any other: no way around the
		// breaker.
		if err := m.mayStart(); err != nil {
			m.reply(Reply{Req: e.Req, Err: err})
			return
		}
	}
	// A sleeping engine serves nobody: it is stopped (its drain finds
	// no lease) and the new model starts awake.
	op := &reloadOp{req: e.Req, ref: e.Ref, digest: e.Digest, prev: m.current, old: m.run, asleep: m.state == Sleeping}
	m.reload = op
	if m.run == nil {
		op.oldGone = true
		m.reloadDrained()
		return
	}
	d := &drainOp{start: m.now, reload: op, held: len(m.leases), deadline: e.Deadline}
	m.drain = d
	m.transition(Draining, "reload")
	m.awaitLeases(d, e.Deadline)
}

// idleReload records the model of an idle pool's reload: no engine
// starts, the pool stays idle, and its next start (a lease, EnsureReady,
// Start) loads the new model.
func (m *Machine) idleReload(e ReloadRequested) {
	if m.current.Digest == e.Digest && m.model == e.Ref {
		m.log(slog.LevelInfo, "reload: the idle pool already loads this model at its next start", journal.Model, e.Ref)
		m.reply(Reply{Req: e.Req, Same: true})
		return
	}
	st := model.Staged{Digest: e.Digest}
	st.Ref = e.Ref
	m.current = st
	m.model, m.digest, m.path = e.Ref, e.Digest, ""
	m.log(slog.LevelInfo, "reload done: the idle pool loads "+e.Ref+" at its next start", journal.MessageIDField, string(journal.MsgReloadDone),
		journal.Model, e.Ref, journal.ModelDigest, e.Digest)
	m.reply(Reply{Req: e.Req})
}

// reloadDrained: no lease holds the old engine any more; the new model is
// staged while the old one still serves nobody.
func (m *Machine) reloadDrained() {
	op := m.reload
	m.reloadTo(op, reloadStaging)
	m.frac.stage = -1
	m.runs++
	op.stageRun = m.runs
	m.do(Stage{Run: op.stageRun, Ref: op.ref, Want: op.digest})
}

// reloadStaged goes on once the new model is staged: a staging failure
// changes nothing.
func (m *Machine) reloadStaged(e ModelStaged) {
	op := m.reload
	if e.Err != nil {
		m.reloadAborted("stage", fmt.Errorf("%w: staging %s: %v (nothing changed)", ErrReloadFailed, op.ref, e.Err))
		return
	}
	op.staged = &e.Staged
	if op.old != nil && !op.oldGone {
		m.reloadTo(op, reloadStopping)
		m.stopRun(StopReload)
		return
	}
	m.startCandidate()
}

// reloadOldGone: the old engine is gone (stopped for the reload, or it
// died on its own meanwhile).
func (m *Machine) reloadOldGone() {
	op := m.reload
	op.oldGone = true
	switch op.phase {
	case reloadDraining:
		// Its leases went with it.
		if d := m.drain; d != nil {
			d.res.LeasesDrainedAt = m.now
			m.disarm(TimerDrainDeadline)
			m.drainTo(d, drainReloading)
		}
		m.reloadDrained()
	case reloadStopping:
		m.startCandidate()
	}
}

func (m *Machine) startCandidate() {
	m.reloadTo(m.reload, reloadStarting)
	m.current = *m.reload.staged
	m.startEngine(true, 0)
}

// reloadAborted ends a reload that changed nothing: the pool goes on as it
// was.
func (m *Machine) reloadAborted(reason string, err error) {
	op := m.reload
	m.reload, m.drain = nil, nil
	m.disarm(TimerDrainDeadline)
	switch r := m.run; {
	case r != nil && op.asleep && r.stopping == NotStopping && (r.sleep.asleep || r.sleep.asking):
		// Healthy, or adopted asleep and not yet probed.
		m.transition(Sleeping, "reload given up")
	case r != nil && r.healthy:
		m.transition(Ready, "reload given up")
	case r == nil && op.old != nil:
		m.transition(Stopped, "reload given up")
	}
	m.reply(Reply{Req: op.req, Err: err, Reason: reason})
}

func (m *Machine) candidateHealthy(r *run) {
	op := m.reload
	m.reload, m.drain = nil, nil
	r.candidate = false
	m.policy(m.tr.Healthy(m.now))
	// LastError stays: it is the last error, not the current one.
	m.transition(Ready, "reloaded")
	m.readyAt, m.heartbeat = m.now, m.now
	m.model, m.digest, m.path = op.ref, r.staged.Digest, r.staged.Path
	m.writeRecord(r, op.ref)
	m.do(Log{Level: slog.LevelInfo, Msg: "reload done: now serving " + op.ref, Engine: true,
		Attrs: []any{journal.MessageIDField, string(journal.MsgReloadDone), journal.ModelDigest, r.staged.Digest}})
	m.reply(Reply{Req: op.req})
}

func (m *Machine) candidateExited(r *run, x Exit) {
	op := m.reload
	if op == nil {
		return
	}
	if r.stopping == StopRollback {
		m.rollbackStart()
		return
	}
	reason, how := "crash", describe("", r, x)
	switch r.stopping {
	case StopHealth:
		reason, how = "health", describe(crash.HealthCheck, r, x)
	case StopStartTimeout:
		reason, how = "start_timeout", describe(crash.StartFailure, r, x)
	}
	m.candidateFailed(reason, "the new engine "+how)
}

// candidateFailed rolls back: the new engine goes (if it still runs),
// then the old model starts.
func (m *Machine) candidateFailed(reason, why string) {
	op := m.reload
	if op == nil || op.phase == reloadRollingBack {
		return
	}
	m.reloadTo(op, reloadRollingBack)
	op.why, op.reason = why, reason
	if r := m.run; r != nil && r.candidate {
		m.stopRun(StopRollback)
		return
	}
	m.rollbackStart()
}

func (m *Machine) rollbackStart() {
	op := m.reload
	m.reload, m.drain = nil, nil
	m.current = op.prev
	m.rollback = &rollbackWait{req: op.req, why: op.why, reason: op.reason, prevRef: m.model, hadOld: op.old != nil}
	if op.old == nil {
		m.transition(Stopped, "rolled back")
		m.rollbackSettled()
		return
	}
	m.startEngine(false, 0)
}

// rollbackSettled answers a rolled-back reload once the old model serves
// again, or has failed to.
func (m *Machine) rollbackSettled() {
	rb := m.rollback
	if rb == nil {
		return
	}
	m.rollback = nil
	msg := fmt.Sprintf("rolled back to %s: %s", rb.prevRef, rb.why)
	if rb.hadOld && m.state != Ready {
		msg += fmt.Sprintf("; the old model is not serving again yet (%s)", m.lastErr)
	}
	m.log(slog.LevelError, "reload "+msg, journal.MessageIDField, string(journal.MsgReloadRolledBack),
		journal.Model, rb.prevRef, journal.Reason, rb.reason)
	m.reply(Reply{Req: rb.req, Err: fmt.Errorf("%w: %s", ErrReloadFailed, msg), Reason: rb.reason})
}

// adopted takes over an engine a previous daemon left running.
func (m *Machine) adopted(e Adopted) {
	if m.run != nil || m.start != nil {
		m.reply(Reply{Req: e.Req, Err: fmt.Errorf("pool %s already runs an engine", m.cfg.Pool)})
		return
	}
	m.current = e.Staged
	m.run = &run{id: e.Run, pid: e.PID, started: e.Started, staged: e.Staged, invocation: e.Invocation}
	// Asleep by its record (a sleeping engine holds no lease); without
	// one, it may be asleep all the same, and is woken before it serves.
	asleep := e.Asleep && m.cfg.Sleep && !e.Starting && len(e.Leases) == 0 && m.state == Stopped
	m.run.sleep.adopted = m.cfg.Sleep && !asleep
	kept := 0
	for id, owner := range e.Leases {
		m.addLease(id, owner)
		kept++
	}
	if asleep {
		m.adoptedAsleep(m.run, e)
	} else {
		m.transition(Starting, "adopted")
	}
	m.live, m.pid = true, e.PID
	m.model, m.digest, m.path = e.Staged.Ref, e.Staged.Digest, e.Staged.Path
	if e.EngineVersion != "" {
		m.version = e.EngineVersion
	}
	switch {
	case e.Starting:
		m.log(slog.LevelInfo, fmt.Sprintf("adopted the engine (pid %d) that was starting, %s into its start", e.PID, m.now.Sub(e.Started).Round(1e6)))
	case asleep:
		m.log(slog.LevelInfo, fmt.Sprintf("adopted the sleeping engine (pid %d): it sleeps on until it is used", e.PID))
	default:
		m.log(slog.LevelInfo, fmt.Sprintf("adopted the running engine (pid %d), %d of %d lease(s) kept", e.PID, kept, e.RecordHeld))
	}
	m.do(Watch{Run: e.Run, StartBy: e.StartBy})
	m.reply(Reply{Req: e.Req})
}

// NewRun names the next engine run (an adopted one's).
func (m *Machine) NewRun() RunID {
	m.runs++
	return m.runs
}
