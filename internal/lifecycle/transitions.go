package lifecycle

import (
	"fmt"
	"log/slog"
	"slices"
	"testing"

	"github.com/llorch/pool-managerd/internal/journal"
)

// transitions is every move of a pool's state the machine makes: from a
// state, the states it may go to. docs/states.md draws the same table
// (a test holds them equal). A move to the state the pool is already in
// is no move and needs no row.
var transitions = map[State][]State{
	Stopped: {
		Starting, // a start: on request, a reload's new engine, an adopted engine
		Failed,   // a start refused by the breaker, or a GPU hold
		Backoff,  // a held exit, settled after a reload gave up, is a crash
		Idle,     // it was idle when the daemon last stopped, or parked for another pool of its group
		Sleeping, // an adopted engine its runtime record says was left asleep
	},
	Starting: {
		Warming,  // healthy: its warm-up is sent
		Ready,    // healthy (no warm-up)
		Draining, // a drain
		Backoff,  // it crashed: a restart is scheduled
		Failed,   // staging or launch failed, a crash held, a GPU hold, or a port held (launch or the engine's bind)
		Stopped,  // a drain with no engine yet, exit 0, an operator's stop, a rollback with no old engine
		Idle,     // an idle pool's start on demand held by another process (GPUs, memory, port)
	},
	Warming: {
		Ready,    // the warm-up request was answered
		Draining, // a drain
		Backoff,  // it crashed: a restart is scheduled
		Failed,   // a crash held, or a GPU hold while its exit is held
		Stopped,  // exit 0, an operator's stop, a rollback with no old engine
		Starting, // a reload's new engine failed: the old model starts again; a warm-up after a wake failed
	},
	Ready: {
		Draining, // a drain or a reload
		Backoff,  // it crashed: a restart is scheduled
		Failed,   // a crash held, or a GPU hold while its exit is held
		Stopped,  // exit 0, or an operator's stop
		Idle,     // no lease and no request in flight for IdleStopSec
		Sleeping, // the same, with Sleep=: its engine is asked to sleep
	},
	Draining: {
		Stopped,  // the drain is done, or the engine went (exit 0, an operator's stop)
		Starting, // a reload's new engine starts
		Ready,    // a reload gave up: the old engine serves again
		Sleeping, // a park's engine (Sleep=) sleeps, or a reload of a sleeping pool gave up
	},
	Backoff: {
		Starting, // the restart is due, or a start
		Failed,   // the restart was refused, or a GPU hold
		Stopped,  // a drain, or an operator stopped the prepared scope
	},
	Failed: {
		Starting, // a start, a retry, a restart
		Stopped,  // a hold lifted, a drain, exit 0 or an operator's stop of a held exit
		Backoff,  // a restart that could not start is a crash
	},
	Idle: {
		Starting, // a lease (StartOnLease), EnsureReady, Start or a reload
		Draining, // a drain while its engine is still being stopped
		Stopped,  // a drain
		Failed,   // a GPU hold
	},
	Sleeping: {
		Waking,   // a lease (StartOnLease), EnsureReady or Start
		Idle,     // the sleep failed: the engine is stopped instead; it crashed parked asleep
		Draining, // a drain
		Backoff,  // it crashed: a restart is scheduled
		Failed,   // a crash held, or a GPU hold while its exit is held
		Stopped,  // exit 0, or an operator's stop
	},
	Waking: {
		Ready,    // awake (no warm-up)
		Warming,  // awake: its warm-up is sent
		Starting, // the wake failed: a fresh engine starts
		Draining, // a drain
		Backoff,  // it crashed: a restart is scheduled
		Failed,   // a crash held, a GPU hold, or the restart after a failed wake refused
		Stopped,  // exit 0, or an operator's stop
	},
}

// strictTransitions: an illegal move panics (under test), else it is
// logged and refused: the root daemon keeps running on the state it had.
var strictTransitions = testing.Testing()

// transition moves the pool to state to, the only way its state
// changes; why says what moved it, for the refusal's log.
func (m *Machine) transition(to State, why string) {
	from := m.state
	if from == to {
		return
	}
	if !slices.Contains(transitions[from], to) {
		m.illegal("pool state", from.String(), to.String(), why)
		return
	}
	m.state = to
	if to == Ready {
		// However it became Ready (a start, a reload, a reload given
		// up), its idle time starts now.
		m.used()
	}
}

// illegal refuses a move its table lacks.
func (m *Machine) illegal(what, from, to, why string) {
	if strictTransitions {
		panic(fmt.Sprintf("lifecycle: illegal %s move %s -> %s (%s)", what, from, to, why))
	}
	m.log(slog.LevelError, "illegal "+what+" move refused: kept as it was",
		journal.OldState, from, journal.NewState, to, journal.Reason, why)
}
