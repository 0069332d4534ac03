package lifecycle

import (
	"fmt"
	"log/slog"
	"syscall"
	"time"

	"github.com/llorch/pool-managerd/internal/crash"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/policy"
	"github.com/llorch/pool-managerd/internal/safetext"
	"github.com/llorch/pool-managerd/internal/witness"
)

// Vanished is the shim's LostWhy when systemd saw the scope end and the
// shim never reported.
const Vanished = "scope vanished: systemd reports the engine's scope ended, and its shim never reported the exit"

func (m *Machine) exited(e Exited) {
	r := m.run
	if r == nil || r.id != e.Run {
		return
	}
	x := e.Exit
	m.run = nil
	m.live, m.pid = false, 0
	// Not live, not ready: said first, before any file is touched.
	m.publish()
	m.do(StopProbes{Run: r.id})
	switch {
	case escalated(r, x):
		// The daemon's own stop ran out of StopTimeoutSec= and systemd
		// killed the whole scope, shim and all: that is the stop, not a
		// lost shim, and the stop keeps its reason.
		m.log(slog.LevelWarn, "engine did not exit on SIGTERM within its stop timeout: its scope was killed with SIGKILL",
			journal.Reason, r.stopping.String())
	case x.Lost:
		// Without its shim nothing reports on the engine any more (and a
		// garbled report may come from an engine that still runs): the
		// scope goes before anything else happens on its GPUs.
		m.log(slog.LevelError, "engine's shim lost: stopping its scope", journal.Error, x.LostWhy)
		m.stopScope(r.id)
	}
	uptime := x.At.Sub(r.started)
	m.do(RemoveRecord{})
	m.recSleep = sleepRecord{}
	unitEnded, cause := m.unitEnded, m.unitCause
	m.unitEnded = false
	if unitEnded && m.pending == nil {
		m.disarm(TimerHoldExit)
	}

	switch {
	case r.candidate:
		m.candidateExited(r, x)
		return
	case r.stopping == StopDrain || r.stopping == StopReload || r.stopping == StopIdle || r.stopping == StopWake:
		// An idle stop, or that of an engine that did not wake, is no
		// crash, whatever the exit.
		m.engineStopped(r)
		return
	case r.stopping == StopOperator:
		m.operatorStopped(r)
		return
	case unitEnded && r.stopping == NotStopping:
		// systemd spoke first.
		m.settle(r, x, uptime, cause)
		return
	case m.cfg.Witness && r.stopping == NotStopping && mayBeStopped(x) && x.LostWhy != Vanished:
		// An exit like this may be an operator's systemctl stop, which
		// systemd tells a few milliseconds after the scope empties: its
		// word decides, or HoldExit without it.
		m.pending = &pendingExit{r: r, x: x, uptime: uptime}
		m.arm(TimerHoldExit, m.now.Add(m.cfg.HoldExit))
		return
	}
	m.exitedOnOwn(r, x, uptime)
}

// escalated says whether the daemon was stopping r and its stop ended in
// systemd's SIGKILL of the whole scope (the engine ignored SIGTERM, or
// could not act on it: llama-server with a request in flight, a frozen
// process).
func escalated(r *run, x Exit) bool {
	return x.Lost && r.stopping != NotStopping && x.ShimSignal == syscall.SIGKILL
}

// mayBeStopped says whether an exit looks like what a stop of the scope
// does to an engine: SIGTERM, SIGKILL, a graceful exit (status 0), or the
// shim gone with it. An OOM kill the scope counted is no stop.
func mayBeStopped(x Exit) bool {
	if x.OOMKills > 0 {
		return false
	}
	if x.Lost || (x.Status.Exited() && x.Status.ExitStatus() == 0) {
		return true
	}
	return x.Status.Signaled() && (x.Status.Signal() == syscall.SIGTERM || x.Status.Signal() == syscall.SIGKILL)
}

// unitChanged is systemd's word on the engine's scope. A scope keeps its
// name across starts: a late word on an earlier one (told apart by its
// InvocationID) is not about the engine running now.
func (m *Machine) unitChanged(ev witness.Event) {
	r := m.run
	if ev.Kind == witness.Started {
		// The engine's invocation comes with its start, from systemd
		// itself: a Started seen here may be an earlier scope's.
		return
	}
	about := func(r *run) bool { return r.invocation == "" || ev.Invocation == "" || r.invocation == ev.Invocation }
	ended := ev.Kind == witness.Dead || ev.Kind == witness.Removed
	if m.prepared != nil && m.prepared.inv != "" && ev.Invocation == m.prepared.inv {
		m.preparedChanged(ev, ended)
		return
	}
	switch {
	case ev.Cause == witness.OperatorStop && (ev.Kind == witness.Stopping || ended):
		if r != nil && r.stopping == NotStopping && !r.candidate && about(r) {
			r.stopping = StopOperator
			m.do(StopProbes{Run: r.id})
		} else if m.pending != nil && about(m.pending.r) {
			m.settleExit(witness.OperatorStop)
		}
	case ended && m.pending != nil && about(m.pending.r):
		m.settleExit(ev.Cause)
	case ended && ev.Cause != witness.OurStop && r != nil && r.stopping == NotStopping && !m.unitEnded &&
		r.invocation != "" && r.invocation == ev.Invocation:
		// systemd saw this engine's scope end before the shim reported:
		// the shim has a moment to, else the scope vanished.
		m.unitEnded, m.unitCause = true, ev.Cause
		m.arm(TimerHoldExit, m.now.Add(m.cfg.HoldExit))
	}
}

// settleExit classifies a held exit with what systemd said of it.
func (m *Machine) settleExit(cause witness.Cause) {
	p := m.pending
	m.pending = nil
	m.disarm(TimerHoldExit)
	m.settle(p.r, p.x, p.uptime, cause)
}

func (m *Machine) settle(r *run, x Exit, uptime time.Duration, cause witness.Cause) {
	switch cause {
	case witness.OperatorStop:
		m.operatorStopped(r)
	case witness.OOMKilled:
		m.crashed(r, crash.OutOfMemory, "out of memory: systemd reports the scope's Result=oom-kill; "+describe("", r, x), &x, uptime)
		m.engineStopped(r)
	default:
		m.exitedOnOwn(r, x, uptime)
	}
}

// holdExpired: systemd's word did not come (a held exit is the shim's to
// classify), or the shim's did not (the scope vanished).
func (m *Machine) holdExpired() {
	if m.pending != nil {
		m.settleExit(witness.NoCause)
		return
	}
	if m.unitEnded && m.run != nil {
		m.unitEnded = false
		m.exited(Exited{Run: m.run.id, Exit: Exit{Lost: true, LostWhy: Vanished, At: m.now}})
	}
}

// operatorStopped honours a stop of the scope that the daemon did not ask
// for, as systemd honours one: stopped, not restarted, no crash.
func (m *Machine) operatorStopped(r *run) {
	m.log(slog.LevelWarn, "engine's scope stopped by an operator (systemctl stop): not restarted until Start", journal.Unit, m.cfg.Unit)
	m.policy(m.tr.Stopped(m.now))
	m.revokeLeases("the engine's scope was stopped")
	m.transition(Stopped, "operator stop")
	m.lastErr = "stopped by an operator: systemctl stop " + m.cfg.Unit
	m.engineStopped(r)
}

// exitedOnOwn handles an exit nobody asked for: status 0 is a graceful
// end, anything else a crash.
func (m *Machine) exitedOnOwn(r *run, x Exit, uptime time.Duration) {
	reason, ok := classify(r, x)
	if !ok {
		m.log(slog.LevelInfo, "engine exited on its own with status 0: not restarted", journal.ExitCode, 0, journal.UptimeSec, int64(uptime.Seconds()))
		m.policy(m.tr.Stopped(m.now))
		m.revokeLeases("the engine exited")
		m.transition(Stopped, "exited with status 0")
		m.lastErr = "exited with status 0"
		m.engineStopped(r)
		return
	}
	if x.PortHeld != "" && !r.healthy && m.drain == nil {
		m.portHeld(r, x)
		return
	}
	m.crashed(r, reason, describe(reason, r, x), &x, uptime)
	m.engineStopped(r)
}

// portHeld: an engine that never answered exited while a socket outside
// its scope held its port (its bind failed): someone else's doing, so no
// crash is counted and the breaker is not fed; the pool is held and
// starts again once the port is free.
func (m *Machine) portHeld(r *run, x Exit) {
	m.log(slog.LevelWarn, "engine exited while another process held its port: not counted as a crash", journal.Error, safetext.Bound(x.PortHeld))
	m.revokeLeases("the engine exited")
	m.lastErr = safetext.Bound("the engine could not listen: " + x.PortHeld)
	if r.onDemand && m.reload == nil {
		m.idleAgain(m.lastErr)
		m.engineStopped(r)
		return
	}
	m.transition(Failed, "port held")
	m.retryLater(ErrPortBusy)
	m.engineStopped(r)
}

// crashed counts a crash: the pool is not live or ready, its leases are
// gone with its engine, and the policy decides when it restarts (unless a
// drain is under way, or the engine was parked asleep: then it does
// not). r is the engine that crashed (nil: a start). uptime < 0: not
// known.
func (m *Machine) crashed(r *run, reason crash.Reason, msg string, x *Exit, uptime time.Duration) {
	// It may quote the engine's output: valid UTF-8 and bounded before
	// it reaches the journal and the bus.
	msg = safetext.Bound(msg)
	d := m.tr.Crash(m.now, reason)
	// The backoff runs from the engine's exit, not from when its exit
	// was settled (systemd's word on a SIGKILL comes milliseconds later).
	var lag time.Duration
	if x != nil && !x.At.IsZero() && x.At.Before(m.now) && !d.Held {
		lag = min(m.now.Sub(x.At), d.Delay)
		d.At = d.At.Add(-lag)
	}
	for i, ev := range d.Events {
		switch c := ev.(type) {
		case policy.Crashed:
			c.Detail, c.Uptime = msg, uptime
			c.EngineVersion, c.Model, c.DeviceMask = m.version, m.model, m.cfg.DeviceMask
			if x != nil {
				c.ExitCode, c.ExitSignal = exitFields(*x)
			}
			d.Events[i] = c
		case policy.RestartScheduled:
			c.At = c.At.Add(-lag)
			d.Events[i] = c
		}
	}
	m.revokeLeases("the engine crashed")
	m.lastErr, m.reason = msg, reason
	if m.drain != nil {
		// A draining pool is not restarted.
		m.policy(append(d.Events, m.tr.Stopped(m.now)...))
		return
	}
	if r != nil && r.sleep.parked {
		// Parked asleep, another member of its group has the GPUs: a
		// restart would load its model beside that member. It stays
		// parked; its next use starts it.
		m.policy(append(d.Events, m.tr.Stopped(m.now)...))
		m.transition(Idle, "crashed while parked asleep")
		m.idleSince = m.now
		return
	}
	m.policy(d.Events)
	if m.held != "" || len(m.gpuHeld) > 0 {
		d.Held, d.At = true, time.Time{}
	}
	if why := m.gpuWhy(); why != "" {
		m.lastErr = safetext.Bound(why + " (" + msg + ")")
	}
	m.next = d.At
	if d.Held {
		m.transition(Failed, "crashed, held")
	} else {
		m.transition(Backoff, "crashed")
	}
	if !d.At.IsZero() {
		m.scheduleRestart(d.At)
	}
	m.rollbackSettled()
}

func exitFields(x Exit) (code *int, signal string) {
	switch {
	case x.Lost && x.ShimSignal != 0:
		return nil, SignalName(x.ShimSignal)
	case x.Lost:
		return nil, ""
	case x.Status.Exited():
		c := x.Status.ExitStatus()
		return &c, ""
	case x.Status.Signaled():
		return nil, SignalName(x.Status.Signal())
	}
	return nil, ""
}

// engineStopped is told of every engine exit.
func (m *Machine) engineStopped(r *run) {
	if m.drain != nil && m.drain.reload == nil {
		m.drainEngineGone()
	}
	if op := m.reload; op != nil && op.old == r {
		m.reloadOldGone()
	}
	if r.stopping == StopIdle {
		m.idleEngineGone()
	}
	if r.stopping == StopWake {
		m.wakeRestart()
	}
}

func (m *Machine) timerFired(e TimerFired) {
	if e.Gen != m.timers.gen[e.Timer] || !m.timers.armed[e.Timer] {
		return
	}
	m.timers.armed[e.Timer] = false
	switch e.Timer {
	case TimerRestart:
		m.restartDue()
	case TimerTick:
		m.policy(m.tr.Tick(m.now))
	case TimerDrainDeadline:
		if d := m.drain; d != nil && (d.phase == drainLeases || d.phase == drainRequests) {
			m.drainDeadline(d)
		}
	case TimerHoldExit:
		m.holdExpired()
	case TimerRetry:
		if !m.busy() && m.gpuWhy() == "" && m.drain == nil {
			m.startEngine(false, 0)
		}
	case TimerPrepare:
		m.prepareDue()
	case TimerFault:
		m.faultUnconfirmed()
	case TimerIdle:
		m.idleDue()
	case TimerWake:
		m.wakeDue()
	default:
		panic(fmt.Sprintf("lifecycle: unknown timer %d", e.Timer))
	}
}
