// Package lifecycle is a pool's life as one explicit state machine: typed
// states, events and stop reasons in, actions out. It is pure: time comes
// in with each event and nothing here touches a process, a file or a
// clock, so every path runs in table tests without root and without
// sleeps. The supervisor owns one Machine per pool, feeds it what its
// shim, prober, systemd, timers and callers report, and carries out the
// actions it returns.
package lifecycle

import (
	"errors"
	"fmt"
	"syscall"
	"time"

	"github.com/llorch/pool-managerd/internal/policy"
)

// State is a pool's state, as the State property names it.
type State uint8

const (
	Stopped State = iota
	Starting
	// Warming: healthy, its warm-up request not yet answered (only where
	// the pool sets one).
	Warming
	Ready
	Draining
	Backoff
	Failed
	// Idle: its engine was stopped because nobody used it for
	// IdleStopSec; a lease (StartOnLease) or EnsureReady brings it back.
	Idle
	// Sleeping: unused for IdleStopSec, its engine (Sleep=vllm) was
	// asked to sleep: it runs, its GPU memory given back.
	Sleeping
	// Waking: a sleeping engine is being woken for a caller.
	Waking
)

var stateNames = [...]string{"stopped", "starting", "warming", "ready", "draining", "backoff", "failed", "idle", "sleeping", "waking"}

func (s State) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("state(%d)", s)
}

// States lists every state, in order.
func States() []State {
	all := make([]State, len(stateNames))
	for i := range all {
		all[i] = State(i)
	}
	return all
}

// ParseState is String's inverse.
func ParseState(s string) (State, error) {
	for i, n := range stateNames {
		if n == s {
			return State(i), nil
		}
	}
	return 0, fmt.Errorf("unknown pool state %q", s)
}

// StopReason says why the manager stops an engine.
type StopReason uint8

const (
	NotStopping StopReason = iota
	// StopDrain: a drain (Stop is a drain with deadline 0).
	StopDrain
	// StopReload: a reload replaces the engine.
	StopReload
	// StopRollback: a reload's new engine failed and goes.
	StopRollback
	// StopHealth: it failed FailureThreshold probes in a row.
	StopHealth
	// StopStartTimeout: it was not healthy within StartTimeoutSec.
	StopStartTimeout
	// StopFault: a GPU fault in its output or an XID on its GPU.
	StopFault
	// StopOperator: systemd stops its scope on someone else's request.
	StopOperator
	// StopStall: requests in flight and no token for StallSec.
	StopStall
	// StopIdle: nobody used it for IdleStopSec.
	StopIdle
	// StopWake: it was asleep and did not wake: a fresh engine replaces
	// it.
	StopWake
)

var stopNames = [...]string{"", "drain", "reload", "rollback", "health", "start-timeout", "fault", "operator", "stall", "idle", "wake"}

func (r StopReason) String() string {
	if int(r) < len(stopNames) {
		return stopNames[r]
	}
	return fmt.Sprintf("stop(%d)", r)
}

// RunID names one engine process's life; events of a run that is over are
// ignored.
type RunID uint64

// ReqID names a caller's request; its Reply carries the same id.
type ReqID uint64

// Timer is one of a pool's timers; the machine keeps at most one of each
// armed.
type Timer uint8

const (
	// TimerRestart: a scheduled restart (or retry of a held one) is due.
	TimerRestart Timer = iota
	// TimerTick: the policy's next time-driven change (a breaker
	// half-opening, a restart leaving the storm window).
	TimerTick
	// TimerDrainDeadline: a drain's leases are revoked.
	TimerDrainDeadline
	// TimerHoldExit: an exit held for systemd's word is settled without
	// it.
	TimerHoldExit
	// TimerRetry: a start that found its GPUs held by another process
	// tries again.
	TimerRetry
	// TimerPrepare: a scheduled restart's scope is made, ahead of it.
	TimerPrepare
	// TimerFault: a GPU fault line of a serving engine that neither its
	// death nor a failed probe confirmed is taken as text.
	TimerFault
	// TimerIdle: the pool has been unused for IdleStopSec.
	TimerIdle
	// TimerWake: the first caller waiting for an idle pool's start gives
	// up.
	TimerWake
	numTimers
)

// Exit is how an engine process ended, as its shim reported it (the
// engine package reads it off the shim).
type Exit struct {
	Status syscall.WaitStatus
	// OOMKills counts OOM kills in the scope during the run.
	OOMKills uint64
	// Lost is set when the shim is no witness any more: it died before
	// reporting (the scope was killed as a whole), or it sent something
	// that is not a report (the engine may still be running). The status
	// is unknown.
	Lost bool
	// LostWhy says which (engine.LostVanished, Vanished, or why a report
	// was refused).
	LostWhy string
	// ShimSignal is the signal that killed a vanished shim, where the
	// daemon reaped it (0: not known).
	ShimSignal syscall.Signal
	At         time.Time
	// PortHeld, when set, names a socket outside the engine's scope that
	// held its port when it exited: an engine that never answered then
	// failed to bind, which is no crash of its own.
	PortHeld string
}

// Errors callers can match with errors.Is.
var (
	ErrNotReady        = errors.New("not ready")
	ErrDraining        = errors.New("draining")
	ErrNoCapacity      = errors.New("no capacity")
	ErrNoSuchLease     = errors.New("no such lease")
	ErrBusy            = errors.New("busy")
	ErrNotOwner        = errors.New("lease held by another owner")
	ErrBreakerOpen     = errors.New("the circuit breaker is open")
	ErrInvalidArgument = errors.New("invalid argument")
	ErrDrainTimeout    = errors.New("drain timeout")
	ErrReloadFailed    = errors.New("reload failed")
	// ErrGPUUnhealthy refuses a start on a GPU that needs a reset.
	ErrGPUUnhealthy = errors.New("GPU unhealthy")
	// ErrGPUBusy is a start that found another process on the pool's
	// GPUs (the supervisor's Launch reports it).
	ErrGPUBusy = errors.New("GPU in use by another process")
	// ErrPortBusy is a start that found the engine's port listened on
	// from outside the pool's scope (the supervisor's Launch reports
	// it): another user squats it.
	ErrPortBusy = errors.New("port held by another process")
	// ErrNoGPUMemory is a start whose GPUs lack the free memory the pool
	// needs (the supervisor's Launch reports it, naming who holds it).
	ErrNoGPUMemory = errors.New("not enough free GPU memory")
	// ErrNoRestartPending refuses an AllowRestart with nothing to allow.
	ErrNoRestartPending = policy.ErrNoRestartPending
)

// GPURetry is how long a start that found its GPUs held waits before it
// looks again, unless Config says otherwise.
const GPURetry = 10 * time.Second

// MemoryRetry is how long a start that found too little free GPU memory
// waits before it looks again (one NVML query), unless Config says
// otherwise: memory is given back when a process ends.
const MemoryRetry = 3 * time.Second

// PortRetry is how long a start that found the engine's port held waits
// before it looks again, unless Config says otherwise: a port is given
// up in a moment, so the pool looks often (one sock_diag lookup).
const PortRetry = 2 * time.Second

// FaultConfirm is how long a GPU fault line in an engine's output waits
// for the engine's death or a failed probe, which it then classifies. A
// line never stops an engine by itself: an engine's output may quote its
// clients (llama-server prints a grammar it cannot parse line by line, and
// with -v logs a formatted prompt raw), so anyone who can send a request
// can write ggml's CUDA error lines into its log. A real fault aborts the
// engine (ggml) or breaks it within a probe or two.
const FaultConfirm = 10 * time.Second

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
