// Package check runs the checks of an engine: the health probe, the stall
// check, the warm-up request and whatever kind comes next. Each kind is a
// plug-in (a package under internal/check) behind Check; each check of an
// engine run has its own goroutine, started with the run's probes and
// ended with them (as kubelet's prober runs one worker per probe). What a
// check finds it tells the pool's lifecycle machine as events.
//
// A new kind is a package implementing Kind and Check, its settings in the
// pool file, and one line in the supervisor's list of kinds.
package check

import (
	"context"
	"net/netip"
	"time"

	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/lifecycle"
)

// Config is what a pool's checks are made from: its [Health] section and
// the engine's health URL, specifiers expanded.
type Config struct {
	HealthURL string
	Health    config.Health
	// Port is the engine's own port (0: none); Sleep and SleepLevel its
	// [Engine] Sleep= and SleepLevel=.
	Port       int
	Sleep      config.Sleep
	SleepLevel int
}

// Kind is one kind of check.
type Kind struct {
	// Name names the kind (Schedule.After refers to it).
	Name string
	// New makes the check of one engine run, or nil where the pool's
	// configuration asks for none of this kind. It is called for every
	// run: a check may keep what it learns of its run.
	New func(Config) Check
}

// Check looks at one engine run. A periodic or following check looks from
// its own goroutine, one look at a time; an on-demand one from a goroutine
// of each asking.
type Check interface {
	// Schedule says when the check looks.
	Schedule() Schedule
	// Check looks once, within the check's own timeout; ctx ends when the
	// run's probes stop.
	Check(ctx context.Context, t Target) Result
}

// Target is the engine run a check looks at.
type Target struct {
	Run lifecycle.RunID
	// Owned checks that a socket answering a check belongs to the
	// engine's scope: while the engine is down or loading another user
	// may listen on its port. Each kind says when it asks.
	Owned func(local, peer netip.AddrPort) error
	// Serving lets the requests the engine must generate for through
	// only while the pool serves (nil: always).
	Serving *Gate
	// Beat takes the time of a look that changed nothing (see
	// Result.Beat); nil: such a look is dropped.
	Beat func(time.Time)
}

// Result is what one look found.
type Result struct {
	// Err: the look failed. It drives the schedule: the start ends with
	// the first look without, and a follower follows looks without.
	Err error
	// Events tell the pool's lifecycle machine what the look found, in
	// this order.
	Events []lifecycle.Event
	// Beat: a good look after a good look, which would change nothing in
	// the machine: it is not told (no wake of the pool's loop for it),
	// only its time kept as the heartbeat (Target.Beat).
	Beat bool
}

// Schedule is when a check looks. Exactly one of Every, After and
// OnDemand is set.
type Schedule struct {
	// Every: the check looks periodically, on a grid of this interval
	// shared by every pool.
	Every time.Duration
	// StartTimeout, for the periodic check that says the engine is up:
	// from the run's start it looks every 2 ms, then at doubling waits
	// up to 100 ms (or Every if shorter), and once a look has no error
	// it looks every Every. A run whose looks all failed
	// within StartTimeout (or by the run's own start deadline) is told
	// as StartTimedOut.
	StartTimeout time.Duration
	// After names the periodic check that this one follows: it looks
	// after each look of that check without error, once the engine is
	// up, and that check's next look waits for it (as one loop would).
	After string
	// OnDemand: the check looks when the lifecycle machine asks (Run's
	// Trigger), once for each asking.
	OnDemand bool
}

// probeEpoch aligns the probes of healthy engines: they fall on multiples
// of their interval from this one instant, so a daemon running many pools
// wakes once per interval for all of them, not once per pool (as systemd
// coalesces timers). On a VM the wake-ups cost more than the probes: for
// 64 pools this is several times less idle CPU.
var probeEpoch = time.Now()

// untilProbe is how long from now to the next aligned look, in (0, every].
func untilProbe(now time.Time, every time.Duration) time.Duration {
	return every - now.Sub(probeEpoch)%every
}

// A new engine is probed every startStep for its first startQuick, then
// at doubling waits up to the start's probe interval: an engine that
// serves at once is Ready within a step, and one that loads a model for
// minutes is asked at the start's interval.
const (
	startStep  = 2 * time.Millisecond
	startQuick = 20 * time.Millisecond
	// startEvery caps the start's probe interval.
	startEvery = 100 * time.Millisecond
)
