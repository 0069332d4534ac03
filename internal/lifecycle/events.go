package lifecycle

import (
	"time"

	"github.com/llorch/pool-managerd/internal/model"
	"github.com/llorch/pool-managerd/internal/witness"
)

// Event is something that happened to the pool; Machine.Step takes one.
type Event interface{ event() }

// Requests from callers. Each is answered by one Reply with its Req.
type (
	// StartRequested: Start a stopped or failed pool; one starting or
	// ready already is left as it is.
	StartRequested struct{ Req ReqID }
	// DrainRequested: drain the pool, revoking leases at Deadline
	// (Stop is a drain with deadline 0).
	DrainRequested struct {
		Req      ReqID
		Deadline time.Duration
	}
	// ReloadRequested: swap the model for Ref (already resolved, with
	// Digest) after a drain bounded by Deadline.
	ReloadRequested struct {
		Req      ReqID
		Ref      string
		Digest   string
		Deadline time.Duration
	}
	// EnsureReadyRequested: answer once the pool is Ready, starting it
	// if it is idle, stopped, failed or in backoff (the policy permitting);
	// Timeout bounds the wait (0: Config.WakeTimeout).
	EnsureReadyRequested struct {
		Req     ReqID
		Timeout time.Duration
	}
	// IdleRestored: the pool was idle when the daemon last stopped (a
	// mark under the runtime directory says since when): it is idle
	// again, not started.
	IdleRestored struct{ Since time.Time }
	// ResetBreakerRequested closes the breakers and lifts a hold.
	ResetBreakerRequested struct{}
	// AllowRestartRequested lets one held restart happen now.
	AllowRestartRequested struct{ Req ReqID }
	// LeaseRequested takes lease ID (chosen by the caller) for Owner.
	LeaseRequested struct {
		Req       ReqID
		ID, Owner string
	}
	// LeaseReleased gives lease ID back; with CheckOwner only Owner may.
	LeaseReleased struct {
		Req        ReqID
		ID, Owner  string
		CheckOwner bool
	}
	// OwnerGone releases every lease of Owner; the reply's N counts them.
	OwnerGone struct {
		Req   ReqID
		Owner string
	}
	// Adopted: an engine a previous daemon left running is taken over.
	Adopted struct {
		Req     ReqID
		Run     RunID
		PID     int
		Started time.Time
		Staged  model.Staged
		// EngineVersion as the record kept it ("" to keep the one known).
		EngineVersion string
		// Leases kept of those the record held (their owners are still
		// there), and how many it held.
		Leases     map[string]string
		RecordHeld int
		// Starting: it had no record, so it was still starting.
		Starting bool
		// StartBy, when set, is when it must be healthy.
		StartBy time.Time
		// Invocation is its scope's InvocationID ("" if not known).
		Invocation string
		// Asleep: the record says the engine was left asleep (since
		// AsleepSince; Parked for its group): with Sleep= it is adopted
		// sleeping, not woken.
		Asleep      bool
		AsleepSince time.Time
		Parked      bool
	}
)

// Reports of the engine, its prober and its start.
type (
	// Hashing: a reload's new model is hashed this far (0..1) before the
	// reload begins; Done when the hash is over.
	Hashing struct {
		Fraction float64
		Done     bool
	}
	// StageProgress: the model of start Run is hashed this far (0..1).
	StageProgress struct {
		Run      RunID
		Fraction float64
	}
	// ModelStaged: the model of start Run is staged (or could not be).
	ModelStaged struct {
		Run    RunID
		Staged model.Staged
		Err    error
	}
	// EngineStarted: the engine process of Run runs in its scope.
	EngineStarted struct {
		Run RunID
		PID int
		// Invocation is its scope's InvocationID ("" if not known).
		Invocation string
		// Caution is what a check before the start could not make sure
		// of ("": none), for LastError.
		Caution string
	}
	// StartFailed: the engine of Run could not be started.
	StartFailed struct {
		Run RunID
		Err error
	}
	// Healthy: Run answered its first health probe.
	Healthy struct{ Run RunID }
	// WarmedUp: Run answered its warm-up request (Err if it did not).
	WarmedUp struct {
		Run RunID
		Err error
	}
	// Probed: a health probe of a healthy Run (Err if it failed). A
	// Canary probe (a request the engine must generate for) is counted
	// apart: a good health probe does not reset its failures, since a
	// broken engine's /health may keep answering.
	Probed struct {
		Run    RunID
		Err    error
		Canary bool
	}
	// Progress is what Run's metrics endpoint said: requests in flight
	// and tokens produced so far (Err if it could not be read).
	Progress struct {
		Run              RunID
		InFlight, Tokens float64
		Err              error
		// NoAnswer: the endpoint did not answer in time (a stuck decode
		// loop may still answer /health).
		NoAnswer bool
	}
	// StartTimedOut: Run was not healthy within its start timeout.
	StartTimedOut struct {
		Run RunID
		Err error
	}
	// Faulted: a GPU fault in Run's output, or an XID on its GPU.
	Faulted struct {
		// Run is 0 for an XID: it concerns whatever runs.
		Run  RunID
		What string
		XID  bool
		// Code and GPU name an XID and the GPU it came from.
		Code uint64
		GPU  string
	}
	// Squatted: another process answers on Run's port.
	Squatted struct {
		Run RunID
		Msg string
	}
	// Died: the kernel says Run's engine process ended; how, its shim
	// tells in Exited.
	Died struct{ Run RunID }
	// Exited: Run's engine process ended.
	Exited struct {
		Run  RunID
		Exit Exit
	}
	// ScopeStopped: systemd's stop job of Run's scope (StopScope) ended:
	// nothing of the scope runs any more, shim included (or the job
	// failed, and there is nothing more to wait for).
	ScopeStopped struct{ Run RunID }
	// GPUUnhealthy: one of the pool's GPUs needs a reset or is lost (Why
	// names the GPU, the XID, its meaning and the remedy): the engine is
	// stopped and the pool held until GPUUsable or AllowRestart.
	GPUUnhealthy struct {
		GPU, Why string
	}
	// GPUUsable: NVML says the GPU is usable again.
	GPUUsable struct{ GPU string }
	// VersionKnown: the engine's version command answered.
	VersionKnown struct{ Version string }
	// UnitChanged is systemd's word on the engine's scope.
	UnitChanged struct{ Event witness.Event }
	// ScopePrepared: a Prepare's scope is made (Invocation is its
	// InvocationID).
	ScopePrepared struct{ Invocation string }
	// Slept: Run's engine answered a Sleep (Err if it did not sleep).
	Slept struct {
		Run RunID
		Err error
	}
	// Woke: Run's engine answered a Wake (Err if it did not wake).
	Woke struct {
		Run RunID
		Err error
	}
	// TimerFired: an armed timer is due; Gen is the ArmTimer's.
	TimerFired struct {
		Timer Timer
		Gen   uint64
	}
)

func (StartRequested) event()        {}
func (DrainRequested) event()        {}
func (ScopeStopped) event()          {}
func (EnsureReadyRequested) event()  {}
func (IdleRestored) event()          {}
func (ReloadRequested) event()       {}
func (ResetBreakerRequested) event() {}
func (AllowRestartRequested) event() {}
func (LeaseRequested) event()        {}
func (LeaseReleased) event()         {}
func (OwnerGone) event()             {}
func (Adopted) event()               {}
func (ModelStaged) event()           {}
func (StageProgress) event()         {}
func (Hashing) event()               {}
func (EngineStarted) event()         {}
func (StartFailed) event()           {}
func (Healthy) event()               {}
func (WarmedUp) event()              {}
func (Probed) event()                {}
func (StartTimedOut) event()         {}
func (Progress) event()              {}
func (Faulted) event()               {}
func (Squatted) event()              {}
func (Exited) event()                {}
func (VersionKnown) event()          {}
func (GPUUnhealthy) event()          {}
func (GPUUsable) event()             {}
func (UnitChanged) event()           {}
func (TimerFired) event()            {}
func (ScopePrepared) event()         {}
func (Died) event()                  {}
func (Slept) event()                 {}
func (Woke) event()                  {}
