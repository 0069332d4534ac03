package lifecycle

import (
	"log/slog"
	"time"

	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/model"
)

// Action is something the supervisor must do, in the order given.
type Action interface{ action() }

type (
	// Stage stages Ref (which must have digest Want, "" for any) for
	// start Run, off the pool's loop and after any stop of the scope
	// under way; ModelStaged reports it.
	Stage struct {
		Run       RunID
		Ref, Want string
	}
	// Launch starts the engine of Run on Staged; EngineStarted or
	// StartFailed reports it.
	Launch struct {
		Run       RunID
		Staged    model.Staged
		Candidate bool
		// Prepared: the scope Prepare made is for this start (if it
		// is for Staged's file; else it is given up).
		Prepared bool
	}
	// Prepare makes, ahead of a scheduled restart, the scope of its
	// engine with Ref (digest Want) staged, and the shim waiting in it;
	// ScopePrepared reports the scope. Launch{Prepared} uses it.
	Prepare struct{ Ref, Want string }
	// Unprepare gives the prepared scope up (its shim killed, the scope
	// stopped); a Prepare still under way is given up when done.
	Unprepare struct{}
	// Watch starts probing Run's health; StartBy, when set, is when it
	// must be healthy (else StartTimeoutSec from now).
	Watch struct {
		Run     RunID
		StartBy time.Time
	}
	// Warmup sends Run its warm-up request; WarmedUp reports it.
	Warmup struct{ Run RunID }
	// ReadProgress reads Run's metrics endpoint once, now; Progress
	// reports it.
	ReadProgress struct{ Run RunID }
	// StopProbes ends Run's probes: it is stopping or gone.
	StopProbes struct{ Run RunID }
	// StopScope stops Run's scope (SIGTERM, SIGKILL after the stop
	// timeout) in the background; its exit comes as Exited.
	StopScope struct{ Run RunID }
	// WriteRecord writes the runtime record of Run (healthy) with Model
	// as its ref and the leases held now. Asleep (since AsleepSince,
	// Parked for its group) says its engine was left asleep: a restarted
	// daemon adopts it sleeping instead of waking it.
	WriteRecord struct {
		Run         RunID
		Model       string
		Asleep      bool
		AsleepSince time.Time
		Parked      bool
	}
	// RemoveRecord removes the runtime record.
	RemoveRecord struct{}
	// LeasesChanged: the leases in the record are stale (written in a
	// batch, see the supervisor).
	LeasesChanged struct{}
	// ArmTimer arms Timer for At; a TimerFired with another Gen is stale.
	ArmTimer struct {
		Timer Timer
		At    time.Time
		Gen   uint64
	}
	// CancelTimer disarms Timer.
	CancelTimer struct{ Timer Timer }
	// Reply answers request Req.
	Reply struct {
		Req ReqID
		Err error
		// Drain is a drain's outcome.
		Drain DrainResult
		// Lease is a new lease's id; N the leases an OwnerGone released.
		Lease string
		N     int
		// Same: a reload found its model already running.
		Same bool
		// Reason is a failed reload's metric label.
		Reason string
	}
	// Publish makes View the pool's published state.
	Publish struct{ View View }
	// Heartbeat records a good probe without waking anyone.
	Heartbeat struct{ At time.Time }
	// Journal writes events (policy decisions, crashes) and persists the
	// policy state when Persist is set.
	Journal struct {
		Events  []journal.Event
		Persist bool
	}
	// Log writes one entry; Engine adds the engine's version, model and
	// device mask.
	Log struct {
		Level  slog.Level
		Msg    string
		Attrs  []any
		Engine bool
	}
	// CountHealthFailure, CountForcedDrain and CountDrain feed metrics.
	CountHealthFailure struct{}
	CountForcedDrain   struct{}
	// CountIdleStop: the engine is stopped for want of use;
	// CountLeaseStart: a start made for a lease or EnsureReady.
	CountIdleStop   struct{}
	CountLeaseStart struct{}
	// Sleep asks Run's engine to sleep at Level (vLLM's POST /sleep);
	// Slept reports it. Wake asks it to wake (POST /wake_up); Woke
	// reports it.
	Sleep struct {
		Run   RunID
		Level int
	}
	Wake struct{ Run RunID }
	// CountWake: a wake ended (Result "ok" or "failed"); Took is how
	// long it took from the wake's start, for an "ok" one.
	CountWake struct {
		Result string
		Took   time.Duration
	}
	CountDrain struct {
		Start  time.Time
		Result DrainResult
	}
)

func (Stage) action()              {}
func (Launch) action()             {}
func (Prepare) action()            {}
func (Unprepare) action()          {}
func (Watch) action()              {}
func (Warmup) action()             {}
func (ReadProgress) action()       {}
func (StopProbes) action()         {}
func (StopScope) action()          {}
func (WriteRecord) action()        {}
func (RemoveRecord) action()       {}
func (LeasesChanged) action()      {}
func (ArmTimer) action()           {}
func (CancelTimer) action()        {}
func (Reply) action()              {}
func (Publish) action()            {}
func (Heartbeat) action()          {}
func (Journal) action()            {}
func (Log) action()                {}
func (CountHealthFailure) action() {}
func (CountForcedDrain) action()   {}
func (CountIdleStop) action()      {}
func (CountLeaseStart) action()    {}
func (CountDrain) action()         {}
func (Sleep) action()              {}
func (Wake) action()               {}
func (CountWake) action()          {}
