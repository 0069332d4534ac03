package lifecycle

import (
	"fmt"
	"slices"
)

// The long operations on a pool (a start, a drain, a reload) each go
// through named phases, each with the phases it may move on to, as the
// pool's states do (transitions). docs/states.md describes them.

// startPhase is how far a start has come, from its decision to its
// engine's process. Once the process runs the start is over and the
// pool's state (Starting, Warming, Ready) follows the engine.
type startPhase uint8

const (
	// startStaging: Stage is out; the model is being staged.
	startStaging startPhase = iota
	// startLaunching: the model is staged and Launch is out; its
	// EngineStarted or StartFailed ends the start.
	startLaunching
)

var startMoves = map[startPhase][]startPhase{
	startStaging: {startLaunching},
}

func (p startPhase) String() string {
	return phaseName(p, "staging", "launching")
}

// drainPhase is how far a drain has come.
type drainPhase uint8

const (
	// drainLeases: no lease is granted; those held are awaited until
	// the last is released or the deadline passes.
	drainLeases drainPhase = iota
	// drainStopping: the leases are gone; the engine is being stopped,
	// and its exit, once its scope's stop job has ended, ends the drain.
	drainStopping
	// drainReloading: a reload's drain whose leases are gone: the
	// reload goes on, and no lease is granted until it ends.
	drainReloading
	// drainRequests: the leases are gone; the engine's own requests in
	// flight (its metrics) are awaited until none is left or the
	// deadline passes.
	drainRequests
	// drainSleeping: a park's leases and requests are gone and its
	// engine (Sleep=) is asked to sleep; its answer ends the park
	// (sleeping), a refusal stops the engine instead.
	drainSleeping
)

var drainMoves = map[drainPhase][]drainPhase{
	drainLeases:   {drainStopping, drainReloading, drainRequests, drainSleeping},
	drainRequests: {drainStopping, drainReloading, drainSleeping},
	drainSleeping: {drainStopping},
}

func (p drainPhase) String() string {
	return phaseName(p, "leases", "stopping", "reloading", "requests", "sleeping")
}

// reloadPhase is how far a reload has come. A reload that cannot
// stage its model, or whose drain's deadline passes, gives up having
// changed nothing; one whose new engine fails rolls back (rollbackWait
// awaits the old model's start).
type reloadPhase uint8

const (
	// reloadDraining: its drain awaits the old engine's leases.
	reloadDraining reloadPhase = iota
	// reloadStaging: the new model is staged (Stage for stageRun is
	// out) while the old engine, if any, serves nobody.
	reloadStaging
	// reloadStopping: the new model is staged; the old engine is being
	// stopped.
	reloadStopping
	// reloadStarting: the new engine (a candidate) starts, until it is
	// healthy (and warm): then the reload is done.
	reloadStarting
	// reloadRollingBack: the new engine failed and is being stopped;
	// the old model starts once it is gone.
	reloadRollingBack
)

var reloadMoves = map[reloadPhase][]reloadPhase{
	reloadDraining: {reloadStaging},
	reloadStaging:  {reloadStopping, reloadStarting},
	reloadStopping: {reloadStarting},
	reloadStarting: {reloadRollingBack},
}

func (p reloadPhase) String() string {
	return phaseName(p, "draining", "staging", "stopping", "starting", "rolling-back")
}

func phaseName[P ~uint8](p P, names ...string) string {
	if int(p) < len(names) {
		return names[p]
	}
	return fmt.Sprintf("phase(%d)", p)
}

// movePhase moves *at to p if its table allows it.
func movePhase[P interface {
	~uint8
	fmt.Stringer
}](m *Machine, what string, moves map[P][]P, at *P, p P) {
	if !slices.Contains(moves[*at], p) {
		m.illegal(what+" phase", (*at).String(), p.String(), "")
		return
	}
	*at = p
}

func (m *Machine) startTo(op *startOp, p startPhase) { movePhase(m, "start", startMoves, &op.phase, p) }

func (m *Machine) drainTo(d *drainOp, p drainPhase) { movePhase(m, "drain", drainMoves, &d.phase, p) }

func (m *Machine) reloadTo(op *reloadOp, p reloadPhase) {
	movePhase(m, "reload", reloadMoves, &op.phase, p)
}
