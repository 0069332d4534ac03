package policy

import (
	"errors"
	"fmt"
	"time"

	"github.com/llorch/pool-managerd/internal/breaker"
	"github.com/llorch/pool-managerd/internal/crash"
	"github.com/llorch/pool-managerd/internal/storm"
)

// Tracker is the restart policy state of one pool. It is not safe for
// concurrent use: the pool's owner calls it. Times passed in never go
// backwards.
type Tracker struct {
	p    Params
	rand func() float64

	crashes  uint64
	restarts uint64
	streak   int
	// last is the reason of the crash whose restart is pending.
	last crash.Reason
	// waiting is set from a crash until its restart is let through.
	waiting bool
	// override is one restart granted by AllowRestart.
	override bool
	// healthySince is when the engine last became healthy; zero while it
	// is not running healthy.
	healthySince time.Time

	breakers *breaker.Set
	window   *storm.Window
}

// New returns the policy for a pool with no history. rand must return
// numbers uniform in [0, 1); it drives the jitter.
func New(p Params, rand func() float64) *Tracker {
	return &Tracker{p: p, rand: rand, breakers: breaker.New(p.Breaker), window: storm.NewWindow(p.Storm)}
}

// Decision is what to do about a crash.
type Decision struct {
	// Held is set when the breaker (opened now or before, possibly by a
	// restart storm) holds the restart: the pool is failed.
	Held bool
	// At is when to restart (or, when Held, when to try again; zero
	// while a test restart is out).
	At time.Time
	// Delay is the backoff delay (zero when Held).
	Delay  time.Duration
	Events []Event
}

// Crash records an engine crash at now and decides when it restarts.
func (t *Tracker) Crash(now time.Time, reason crash.Reason) Decision {
	ev := t.settle(now)
	t.healthySince = time.Time{}
	t.crashes++
	t.streak++
	t.last = reason
	t.waiting = true
	ev = append(ev, Crashed{Reason: reason, CrashCount: t.crashes, Streak: t.streak, RestartCount: t.restarts, Uptime: -1})
	ev = t.transitions(ev, t.breakers.Failure(now, reason.Class()))

	delay := t.p.Backoff.Delay(t.streak, reason, t.rand())
	due := now.Add(delay)
	if n := t.window.Count(due); n >= t.p.Storm.Max {
		kind, class := storm.Classify(append(t.window.Reasons(due), reason))
		ev = append(ev, StormDetected{Storm{Kind: kind, InWindow: n, Window: t.p.Storm.Window, RestartCount: t.restarts}})
		ev = t.transitions(ev, t.breakers.Trip(now, class))
	} else if n+1 > t.p.Storm.WarnAt() {
		kind, _ := storm.Classify(append(t.window.Reasons(due), reason))
		ev = append(ev, StormWarning{Storm{Kind: kind, InWindow: n + 1, Window: t.p.Storm.Window, RestartCount: t.restarts}, t.p.Storm.Max})
	}

	if t.breakers.State() == breaker.Open {
		retry := t.breakers.OpenUntil()
		if a := t.window.AllowedAt(retry); a.After(retry) {
			retry = a
		}
		ev = append(ev, RestartHeld{Reason: reason, RetryAt: retry})
		return Decision{Held: true, At: retry, Events: ev}
	}
	ev = append(ev, RestartScheduled{Reason: reason, Delay: delay, At: due, CrashCount: t.crashes, RestartCount: t.restarts, Streak: t.streak})
	return Decision{At: due, Delay: delay, Events: ev}
}

// Refusal says why a restart may not happen now.
type Refusal struct {
	// Why is "circuit breaker open", "circuit breaker test restart in
	// progress" or "restart storm limit reached".
	Why string
	// RetryAt is when to ask again; zero while a test restart is out.
	RetryAt time.Time
}

func (r *Refusal) Error() string {
	if r.RetryAt.IsZero() {
		return "restart refused: " + r.Why
	}
	return fmt.Sprintf("restart refused: %s until %s", r.Why, at(r.RetryAt))
}

// Permit is a restart let through.
type Permit struct {
	// Test is set for the single test restart of a half-open breaker.
	Test bool
	// Override is set when AllowRestart let it through.
	Override bool
	Events   []Event
}

// ErrNoRestartPending is returned when there is no crash awaiting a restart.
var ErrNoRestartPending = errors.New("no restart is pending: the engine has not crashed since its last start")

// Restart asks to restart the crashed engine now. On success the restart
// is counted: the caller must start the engine. The permit's events are
// set also when the restart is refused.
func (t *Tracker) Restart(now time.Time) (Permit, error) {
	ev := t.settle(now)
	if t.breakers.Testing() {
		return Permit{Events: ev}, &Refusal{Why: "circuit breaker test restart in progress"}
	}
	if !t.waiting {
		return Permit{Events: ev}, ErrNoRestartPending
	}
	var p Permit
	if t.override {
		t.override = false
		p.Override = true
	} else {
		if t.window.Count(now) >= t.p.Storm.Max {
			return Permit{Events: ev}, &Refusal{Why: "restart storm limit reached", RetryAt: t.window.AllowedAt(now)}
		}
		ok, test, retry := t.breakers.Allow(now)
		if !ok {
			return Permit{Events: ev}, &Refusal{Why: "circuit breaker open", RetryAt: retry}
		}
		p.Test = test
	}
	t.waiting = false
	t.restarts++
	t.window.Add(now, t.last)
	p.Events = append(ev, Restarting{Reason: t.last, RestartCount: t.restarts, InWindow: t.window.Count(now), Test: p.Test, Override: p.Override})
	return p, nil
}

// Start asks to start the engine on an operator's or the daemon's request
// (Start, Reload, a configuration reload). A pending restart goes through
// Restart; otherwise a start is no way around the breaker: an open breaker
// refuses it, a half-open one lets it through as its single test, and an
// AllowRestart override lets it through once. Such a start is not counted
// as a restart.
func (t *Tracker) Start(now time.Time) (Permit, error) {
	if t.waiting {
		return t.Restart(now)
	}
	ev := t.settle(now)
	if t.override {
		t.override = false
		return Permit{Override: true, Events: ev}, nil
	}
	if t.breakers.Testing() {
		return Permit{Events: ev}, &Refusal{Why: "circuit breaker test restart in progress"}
	}
	ok, test, retry := t.breakers.Allow(now)
	if !ok {
		return Permit{Events: ev}, &Refusal{Why: "circuit breaker open", RetryAt: retry}
	}
	return Permit{Test: test, Events: ev}, nil
}

// Healthy records that the engine became healthy at now.
func (t *Tracker) Healthy(now time.Time) []Event {
	ev := t.settle(now)
	if t.healthySince.IsZero() {
		t.healthySince = now
	}
	return ev
}

// Stopped records a stop the manager asked for (drain, reload, operator):
// not a crash, and it cancels a pending restart.
func (t *Tracker) Stopped(now time.Time) []Event {
	ev := t.settle(now)
	t.healthySince = time.Time{}
	t.waiting = false
	t.override = false
	if t.breakers.State() == breaker.HalfOpen {
		t.breakers.Abandon()
	}
	return ev
}

// Tick applies what the passing of time alone changes; call it at
// NextTick.
func (t *Tracker) Tick(now time.Time) []Event { return t.settle(now) }

// ResetBreaker closes every breaker, zeroes their failure counts and starts
// the backoff over. Crash and restart counts are history and stay, and so
// does the storm window: a restart held by the storm limit is let through
// once, and a storm that goes on is caught again.
func (t *Tracker) ResetBreaker(now time.Time) []Event {
	ev := t.settle(now)
	ev = t.transitions(ev, t.breakers.Reset(now))
	t.streak = 0
	if t.waiting && t.window.Count(now) >= t.p.Storm.Max {
		t.override = true
	}
	return append(ev, OperatorOverride{Action: "ResetBreaker", CrashCount: t.crashes, RestartCount: t.restarts})
}

// AllowRestart lets the pending restart (or, while the breaker is open, the
// next start) through once, past the breaker and the storm limit, without
// resetting any counter.
func (t *Tracker) AllowRestart(now time.Time) ([]Event, error) {
	ev := t.settle(now)
	// A stopped pool whose breaker is open has no pending restart, yet
	// its next Start needs the same override.
	if !t.waiting && t.breakers.State() != breaker.Open {
		return ev, ErrNoRestartPending
	}
	t.override = true
	return append(ev, OperatorOverride{Action: "AllowRestart", CrashCount: t.crashes, RestartCount: t.restarts}), nil
}

func (t *Tracker) transitions(ev []Event, tr []breaker.Transition) []Event {
	for _, x := range tr {
		ev = append(ev, BreakerChanged{x})
	}
	return ev
}

func (t *Tracker) settle(now time.Time) []Event {
	t.window.Prune(now)
	ev := t.transitions(nil, t.breakers.Settle(now, t.healthySince))
	if t.healthySince.IsZero() {
		return ev
	}
	up := now.Sub(t.healthySince)
	if t.streak > 0 && up >= t.p.Backoff.Stable {
		t.streak = 0
		ev = append(ev, Recovered{What: "backoff", Stable: t.p.Backoff.Stable})
	}
	if t.restarts > 0 && up >= t.p.RestartCountReset {
		t.restarts = 0
		ev = append(ev, Recovered{What: "restart_count", Stable: t.p.RestartCountReset})
	}
	return ev
}

// NextTick is the earliest time after which Tick would change something,
// or zero if only a new event can. A restart leaving the storm window is
// such a change: the restart rate falls.
func (t *Tracker) NextTick() time.Time {
	next := t.breakers.NextChange(t.healthySince)
	earlier := func(u time.Time) {
		if next.IsZero() || u.Before(next) {
			next = u
		}
	}
	if u := t.window.NextExit(); !u.IsZero() {
		earlier(u)
	}
	if !t.healthySince.IsZero() {
		if t.streak > 0 {
			earlier(t.healthySince.Add(t.p.Backoff.Stable))
		}
		if t.restarts > 0 {
			earlier(t.healthySince.Add(t.p.RestartCountReset))
		}
	}
	return next
}

// Status is a read-only view of the policy state.
type Status struct {
	CrashCount   uint64
	RestartCount uint64
	// Streak is the number of crashes since the engine last ran stable.
	Streak  int
	Breaker breaker.State
	// Breakers holds each class's state and consecutive failure count.
	Breakers map[crash.Class]ClassStatus
	// RestartRate is the number of restarts in the storm window.
	RestartRate int
	// Pending is set while a crashed engine awaits its restart.
	Pending bool
}

// ClassStatus is one breaker's state.
type ClassStatus struct {
	State    breaker.State
	Failures int
}

// Status returns the state at now without changing it.
func (t *Tracker) Status(now time.Time) Status {
	s := Status{
		CrashCount:   t.crashes,
		RestartCount: t.restarts,
		Streak:       t.streak,
		Breaker:      t.breakers.State(),
		Breakers:     map[crash.Class]ClassStatus{},
		RestartRate:  t.window.Count(now),
		Pending:      t.waiting,
	}
	for _, c := range append([]crash.Class{crash.ClassGeneral}, crash.Classes...) {
		st, n := t.breakers.Class(c)
		s.Breakers[c] = ClassStatus{State: st, Failures: n}
	}
	return s
}

// OpenFor is how long the class's breaker stays open when it next opens.
func (t *Tracker) OpenFor(c crash.Class) time.Duration { return t.breakers.OpenFor(c) }

// State is what of a pool's policy survives a daemon restart: a restart
// must not be a way around the breaker, nor reset the counters.
type State struct {
	CrashCount   uint64       `json:"crash_count"`
	RestartCount uint64       `json:"restart_count"`
	Streak       int          `json:"streak"`
	LastReason   crash.Reason `json:"last_reason,omitempty"`
	// Pending is set when a crashed engine had not been restarted yet.
	Pending  bool             `json:"pending"`
	Breakers breaker.SetState `json:"breakers"`
	Restarts []storm.Restart  `json:"restarts,omitempty"`
}

// Save returns the state to persist.
func (t *Tracker) Save() State {
	return State{
		CrashCount: t.crashes, RestartCount: t.restarts, Streak: t.streak, LastReason: t.last,
		Pending: t.waiting, Breakers: t.breakers.Save(), Restarts: t.window.Save(),
	}
}

// Restore puts back a saved state.
func (t *Tracker) Restore(s State) {
	t.crashes, t.restarts, t.last, t.waiting = s.CrashCount, s.RestartCount, s.LastReason, s.Pending
	t.streak = max(s.Streak, 0)
	t.breakers.Restore(s.Breakers)
	t.window.Restore(s.Restarts)
}

// Check says what in a state read back from disk is impossible. Such a
// file is refused whole: quietly dropping the bad part could close an
// open breaker.
func (s State) Check() error {
	var errs []error
	if s.Streak < 0 {
		errs = append(errs, fmt.Errorf("streak %d is negative", s.Streak))
	}
	if s.LastReason != "" {
		if _, err := crash.ParseReason(string(s.LastReason)); err != nil {
			errs = append(errs, fmt.Errorf("last_reason: %w", err))
		}
	}
	known := map[crash.Class]bool{crash.ClassGeneral: true}
	for _, c := range crash.Classes {
		known[c] = true
	}
	for c, cs := range s.Breakers.Classes {
		switch {
		case !known[c]:
			errs = append(errs, fmt.Errorf("breakers: unknown class %q", c))
		case cs.State < breaker.Closed || cs.State > breaker.HalfOpen:
			errs = append(errs, fmt.Errorf("breakers: class %q has impossible state %d", c, cs.State))
		case cs.Failures < 0 || cs.OpenFor < 0:
			errs = append(errs, fmt.Errorf("breakers: class %q has a negative count or open time", c))
		}
	}
	for i, r := range s.Restarts {
		if _, err := crash.ParseReason(string(r.Reason)); err != nil {
			errs = append(errs, fmt.Errorf("restarts[%d]: %w", i, err))
		}
	}
	return errors.Join(errs...)
}
