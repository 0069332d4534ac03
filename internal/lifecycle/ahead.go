package lifecycle

import (
	"log/slog"
	"time"

	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/witness"
)

// A restart's scope is made during its backoff (Config.Ahead before it is
// due), with the shim waiting in it: at the restart, only the check of
// the GPUs and the engine's exec are left. The backoff is the engine's,
// not systemd's: no engine runs before the restart is due, and no scope
// is left waiting once the restart is called off.

// minAhead is the shortest lead worth preparing: systemd makes a scope in
// about 20 ms.
func (m *Machine) minAhead() time.Duration { return m.cfg.Ahead / 5 }

// prepareAhead arms the preparation of a restart due at.
func (m *Machine) prepareAhead(at time.Time) {
	m.disarm(TimerPrepare)
	if m.cfg.Ahead <= 0 {
		return
	}
	lead := m.cfg.Ahead
	if m.cfg.Spread != nil {
		lead += time.Duration(3 * m.cfg.Spread() * float64(m.cfg.Ahead))
	}
	lead = min(lead, at.Sub(m.now))
	if lead < m.minAhead() {
		return
	}
	m.arm(TimerPrepare, at.Add(-lead))
}

// prepareDue prepares the scheduled restart's scope, if the restart is
// still on.
func (m *Machine) prepareDue() {
	if !m.timers.armed[TimerRestart] || m.prepared != nil || m.busy() || m.held != "" || m.gpuWhy() != "" {
		return
	}
	ref, want := m.stageRef()
	m.prepared = &preparedScope{}
	m.do(Prepare{Ref: ref, Want: want})
}

// unprepare gives up a prepared scope and its pending preparation.
func (m *Machine) unprepare() {
	m.disarm(TimerPrepare)
	if m.prepared != nil {
		m.prepared = nil
		m.do(Unprepare{})
	}
}

// keepPrepared runs after every step: a prepared scope lives only while
// its restart is scheduled or starting.
func (m *Machine) keepPrepared() {
	if m.prepared == nil && !m.timers.armed[TimerPrepare] {
		return
	}
	starting := m.start != nil && m.start.phase == startStaging
	if !m.timers.armed[TimerRestart] && !starting {
		m.unprepare()
	}
}

// preparedChanged is systemd's word on the prepared scope. An operator's
// stop of it is a stop of the pool, as it would be of a running engine; a
// scope that ends otherwise (killed) is made again at the restart.
func (m *Machine) preparedChanged(ev witness.Event, ended bool) {
	switch {
	case ev.Cause == witness.OperatorStop && (ev.Kind == witness.Stopping || ended):
		m.log(slog.LevelWarn, "engine's scope stopped by an operator (systemctl stop) during the backoff: not restarted until Start", journal.Unit, m.cfg.Unit)
		m.cancelRestart()
		m.cancelStart("its scope was stopped by an operator")
		m.policy(m.tr.Stopped(m.now))
		m.transition(Stopped, "operator stop of the prepared scope")
		m.next, m.lastErr = time.Time{}, "stopped by an operator: systemctl stop "+m.cfg.Unit
	case ended:
		m.unprepare()
	}
}
