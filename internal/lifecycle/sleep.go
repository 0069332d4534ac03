package lifecycle

import (
	"log/slog"
	"time"

	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/safetext"
)

// Sleep=vllm: a Ready pool nobody uses for IdleStop asks its engine to
// sleep (Sleeping: the process runs, its GPU memory given back) instead
// of stopping it; a lease (StartOnLease), EnsureReady or Start wakes it
// (Waking), warms it up where the pool sets a warm-up, and it is Ready
// with the same process. A sleep that fails is an idle stop; a wake that
// fails (or whose warm-up fails) is a health failure, not a crash: the
// engine is stopped and a fresh one started for the callers. An engine
// that dies on its own while asleep or waking crashed. Its runtime record
// says it was left asleep, so that a restarted daemon adopts it Sleeping
// instead of waking it.

// sleepState is where a run stands with sleep.
type sleepState struct {
	// asking: a Sleep is out; asleep: it was answered.
	asking, asleep bool
	// wanted: a Start came while the Sleep was out: wake once it is
	// answered.
	wanted bool
	// wakeAt is when the wake under way began (zero: none).
	wakeAt time.Time
	// adopted: an engine a previous daemon left may have been left
	// asleep (its record does not say): it is woken (a no-op for an
	// awake one) before it serves; adoptWake: that Wake is out.
	adopted, adoptWake bool
	// parked: asleep for a park: another member of its group may have
	// the GPUs.
	parked bool
}

// sleepRecord is what the runtime record says of sleep: the engine was
// left asleep, since when, and whether for its group.
type sleepRecord struct {
	asleep bool
	since  time.Time
	parked bool
}

// recordOf is the runtime record of r (Model model) as things stand.
func (m *Machine) recordOf(r *run, model string) WriteRecord {
	w := WriteRecord{Run: r.id, Model: model}
	if r.sleep.asleep {
		w.Asleep, w.AsleepSince, w.Parked = true, m.idleSince, r.sleep.parked
	}
	return w
}

// writeRecord has r's runtime record written.
func (m *Machine) writeRecord(r *run, model string) {
	w := m.recordOf(r, model)
	m.recSleep = sleepRecord{w.Asleep, w.AsleepSince, w.Parked}
	m.do(w)
}

// recordSleep keeps what the runtime record says of sleep in step with
// the engine, so that a restarted daemon knows an engine left asleep:
// asleep once its Sleep is answered, awake as a wake starts (written
// before the Wake goes out: an engine recorded asleep must be). The
// record goes with the engine.
func (m *Machine) recordSleep() {
	r := m.run
	if r == nil || r.stopping != NotStopping || r.dead || r.candidate {
		return
	}
	w := m.recordOf(r, m.model)
	if (sleepRecord{w.Asleep, w.AsleepSince, w.Parked}) != m.recSleep {
		m.writeRecord(r, m.model)
	}
}

// adoptedAsleep takes over an engine its record says was left asleep: it
// sleeps on (the same process, not woken), parked if it was, until it is
// wanted, as any sleeping engine; woken, another member of its group
// would have its weights loaded beside the awake one's.
func (m *Machine) adoptedAsleep(r *run, e Adopted) {
	r.sleep = sleepState{asleep: true, parked: e.Parked}
	m.recSleep = sleepRecord{true, e.AsleepSince, e.Parked}
	m.transition(Sleeping, "adopted asleep")
	m.idleSince = e.AsleepSince
	if e.AsleepSince.IsZero() || e.AsleepSince.After(m.now) {
		m.idleSince = m.now
	}
}

// wakeAdopted asks an adopted engine, healthy now, to wake before it
// serves; it says whether it did.
func (m *Machine) wakeAdopted(r *run) bool {
	if !r.sleep.adopted {
		return false
	}
	r.sleep.adopted, r.sleep.adoptWake = false, true
	m.do(Wake{Run: r.id})
	return true
}

// sleepRun asks an unused engine to sleep.
func (m *Machine) sleepRun(r *run) {
	m.transition(Sleeping, "unused")
	m.idleSince = m.now
	r.sleep = sleepState{asking: true}
	// The stall rule starts over when it wakes.
	r.movedAt, r.inFlight = time.Time{}, 0
	m.do(Sleep{Run: r.id, Level: max(m.cfg.SleepLevel, 1)})
	m.log(slog.LevelInfo, "pool idle: engine asked to sleep to give its GPU memory back", journal.Reason, StopIdle.String(),
		journal.DurationSec, m.cfg.IdleStop.Seconds())
}

// slept: the engine answered the Sleep. One that did not sleep is
// stopped, as an idle engine without Sleep= is.
func (m *Machine) slept(e Slept) {
	r := m.unstopped(e.Run)
	if d := m.drain; r != nil && d != nil && d.phase == drainSleeping && r.sleep.asking {
		m.parkSlept(d, r, e.Err)
		return
	}
	if r != nil && r.sleep.asking && m.reload != nil && m.reload.old == r {
		// A reload took the sleeping pool over: it stops this engine,
		// or, given up, leaves it as it is now.
		r.sleep.asking, r.sleep.asleep = false, e.Err == nil
		return
	}
	if r == nil || m.state != Sleeping || !r.sleep.asking {
		return
	}
	r.sleep.asking = false
	if e.Err != nil {
		msg := safetext.Bound(e.Err.Error())
		m.lastErr = "sleep failed: " + msg
		m.log(slog.LevelWarn, "engine did not sleep: stopped instead", journal.Error, msg)
		r.stopping = StopIdle
		m.do(StopProbes{Run: r.id}, StopScope{Run: r.id})
		m.policy(m.tr.Stopped(m.now))
		m.transition(Idle, "sleep failed")
		m.do(CountIdleStop{})
		return
	}
	r.sleep.asleep = true
	m.log(slog.LevelInfo, "engine asleep")
	if len(m.waiters) > 0 || r.sleep.wanted {
		m.wakeRun(r)
		return
	}
	m.recordSleep()
}

// wakeSleeping wakes a sleeping engine, or has it woken once its Sleep is
// answered.
func (m *Machine) wakeSleeping() {
	r := m.run
	if m.state != Sleeping || r == nil || r.stopping != NotStopping {
		return
	}
	if r.sleep.asleep && r.healthy {
		m.wakeRun(r)
		return
	}
	// Its Sleep is out, or it was adopted asleep and has not answered a
	// probe yet.
	r.sleep.wanted = true
}

func (m *Machine) wakeRun(r *run) {
	m.transition(Waking, "wake")
	m.waking = true
	r.sleep = sleepState{wakeAt: m.now}
	// Its warm-up, where the pool sets one, comes again before it serves.
	r.warm = false
	m.recordSleep()
	m.do(Wake{Run: r.id})
	m.log(slog.LevelInfo, "pool waking on demand", journal.Reason, "demand")
}

// woke: the engine answered the Wake.
func (m *Machine) woke(e Woke) {
	r := m.unstopped(e.Run)
	if r != nil && r.sleep.adoptWake && m.state == Starting {
		r.sleep.adoptWake = false
		if e.Err != nil {
			m.wakeFailed(r, "wake of the adopted engine failed: "+safetext.Bound(e.Err.Error()))
			return
		}
		m.awake(r)
		return
	}
	if r == nil || m.state != Waking {
		return
	}
	if e.Err != nil {
		m.wakeFailed(r, "wake failed: "+safetext.Bound(e.Err.Error()))
		return
	}
	if m.cfg.Warmup {
		m.transition(Warming, "awake")
		m.do(Warmup{Run: r.id})
		return
	}
	m.serving(r)
}

// waking says whether r is back from sleep and not yet serving.
func (r *run) waking() bool { return !r.sleep.wakeAt.IsZero() }

// wakeFailed stops an engine that did not wake (or failed its warm-up
// after waking): a health failure; its exit starts a fresh engine.
func (m *Machine) wakeFailed(r *run, msg string) {
	r.lastProbe = msg
	m.lastErr = msg
	r.failures = append(r.failures, m.now)
	m.healthFailures = r.allFailures()
	m.do(CountHealthFailure{}, CountWake{Result: "failed"})
	m.log(slog.LevelWarn, "engine did not wake: replaced by a fresh engine", journal.Error, msg)
	r.stopping = StopWake
	m.do(StopProbes{Run: r.id}, StopScope{Run: r.id})
	m.policy(m.tr.Stopped(m.now))
}

// wakeRestart: the engine that did not wake is gone; a fresh one starts
// (the policy permitting), for the callers waiting or none.
func (m *Machine) wakeRestart() {
	if m.drain != nil || m.busy() {
		return
	}
	if err := m.mayStart(); err != nil {
		m.lastErr = safetext.Bound(err.Error())
		m.transition(Failed, "restart after a failed wake refused")
		return
	}
	m.waking = true
	m.startEngine(false, 0)
	// The pool was resting: a start held by another process leaves it
	// idle.
	m.start.onDemand = true
}

// woken is told when a woken engine serves again.
func (m *Machine) woken(r *run) {
	m.do(CountWake{Result: "ok", Took: m.now.Sub(r.sleep.wakeAt)})
	m.log(slog.LevelInfo, "engine awake and ready", journal.DurationSec, m.now.Sub(r.sleep.wakeAt).Seconds())
	r.sleep = sleepState{}
}

// asleep says whether the engine is asleep or on its way in or out of
// sleep: its canaries and the stall rule do not count.
func (m *Machine) asleep(r *run) bool {
	return m.state == Sleeping || m.state == Waking || r.waking() || r.sleep.asking || r.sleep.asleep
}
