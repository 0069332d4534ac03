// Package breaker is a pool's circuit breaker: after too many failures in a
// row it stops restarts for a while, then lets exactly one test restart
// through, and closes only when that engine has run healthy long enough.
//
// A pool has one breaker per crash class plus a general one. A run of
// failures of one class trips that class's breaker (so the operator sees
// "cuda" and not just "open"); a run of mixed failures that no class
// explains trips the general one. Any open breaker holds the pool.
package breaker

import (
	"fmt"
	"time"

	"github.com/llorch/pool-managerd/internal/crash"
)

// State is a breaker state. Its numeric value is the metric value.
type State int

const (
	Closed   State = 0
	Open     State = 1
	HalfOpen State = 2
)

func (s State) String() string {
	switch s {
	case Closed:
		return "closed"
	case Open:
		return "open"
	case HalfOpen:
		return "half-open"
	}
	return fmt.Sprintf("State(%d)", int(s))
}

// Params are the [Restart] breaker settings of a pool.
type Params struct {
	// Threshold is the number of consecutive failures that opens a breaker.
	Threshold int
	// Open is how long a freshly opened breaker holds restarts.
	Open time.Duration
	// OpenMax caps the open time, which doubles each time a test fails.
	OpenMax time.Duration
	// Stable is how long the test engine must run healthy to close the
	// breaker; in the closed state it also clears the failure count.
	Stable time.Duration
}

// Defaults are the seed's numbers; OpenMax is ours (twelve doublings of
// nothing would be a day: an hour is as long as an operator should wait).
func Defaults() Params {
	return Params{Threshold: 5, Open: 300 * time.Second, OpenMax: time.Hour, Stable: 60 * time.Second}
}

// Validate reports settings that cannot work.
func (p Params) Validate() error {
	switch {
	case p.Threshold < 1:
		return fmt.Errorf("threshold must be at least 1, got %d", p.Threshold)
	case p.Open <= 0:
		return fmt.Errorf("open time must be positive, got %s", p.Open)
	case p.OpenMax < p.Open:
		return fmt.Errorf("maximum open time %s is below the open time %s", p.OpenMax, p.Open)
	case p.Stable <= 0:
		return fmt.Errorf("stable period must be positive, got %s", p.Stable)
	}
	return nil
}

// Transition is one breaker changing state.
type Transition struct {
	Class    crash.Class
	From, To State
	// Failures is the breaker's consecutive failure count at the change.
	Failures int
	// Until is when an open breaker turns half-open (zero otherwise).
	Until time.Time
}

type breaker struct {
	state    State
	failures int
	openFor  time.Duration
	openedAt time.Time
}

// Set holds the breakers of one pool.
type Set struct {
	p Params
	b map[crash.Class]*breaker
	// testing is set while the one test restart of a half-open breaker is
	// out: no other restart may pass until it succeeds or fails.
	testing bool
}

// New returns a Set with every breaker closed.
func New(p Params) *Set {
	s := &Set{p: p, b: make(map[crash.Class]*breaker, len(crash.Classes)+1)}
	for _, c := range allClasses() {
		s.b[c] = &breaker{openFor: p.Open}
	}
	return s
}

func allClasses() []crash.Class {
	return append([]crash.Class{crash.ClassGeneral}, crash.Classes...)
}

func (s *Set) change(c crash.Class, to State, now time.Time) Transition {
	b := s.b[c]
	t := Transition{Class: c, From: b.state, To: to, Failures: b.failures}
	b.state = to
	if to == Open {
		b.openedAt = now
		t.Until = now.Add(b.openFor)
	}
	return t
}

// Failure records a crash of the given class at now.
func (s *Set) Failure(now time.Time, class crash.Class) []Transition {
	var out []Transition
	if s.testing {
		// The test restart failed: every half-open breaker reopens, for
		// twice as long as before.
		s.testing = false
		for _, c := range allClasses() {
			if b := s.b[c]; b.state == HalfOpen {
				b.failures++
				b.openFor = min(2*b.openFor, s.p.OpenMax)
				out = append(out, s.change(c, Open, now))
			}
		}
	}
	cb, gb := s.b[class], s.b[crash.ClassGeneral]
	cb.failures++
	if class != crash.ClassGeneral {
		gb.failures++
	}
	switch {
	case cb.state == Closed && cb.failures >= s.p.Threshold:
		out = append(out, s.change(class, Open, now))
	case gb.state == Closed && gb.failures >= s.p.Threshold && s.State() == Closed:
		out = append(out, s.change(crash.ClassGeneral, Open, now))
	}
	return out
}

// Trip opens the class's breaker now whatever its count (a restart storm
// does this).
func (s *Set) Trip(now time.Time, class crash.Class) []Transition {
	if s.b[class].state == Open {
		return nil
	}
	if s.b[class].state == HalfOpen {
		s.testing = false
	}
	return []Transition{s.change(class, Open, now)}
}

// Settle applies what time alone changes: open breakers whose time is up
// turn half-open, and an engine healthy since healthySince (zero: not
// healthy) for the stable period closes half-open breakers and clears
// failure counts.
func (s *Set) Settle(now, healthySince time.Time) []Transition {
	var out []Transition
	stable := !healthySince.IsZero() && now.Sub(healthySince) >= s.p.Stable
	for _, c := range allClasses() {
		b := s.b[c]
		switch {
		case b.state == Open && !now.Before(b.openedAt.Add(b.openFor)):
			out = append(out, s.change(c, HalfOpen, now))
		case b.state == HalfOpen && stable && s.testing:
			out = append(out, s.change(c, Closed, now))
			b.failures = 0
			b.openFor = s.p.Open
		case b.state == Closed && stable:
			b.failures = 0
		}
	}
	if stable && s.State() == Closed {
		s.testing = false
	}
	return out
}

// Allow asks whether a restart may start now. When a breaker is half-open
// the first call lets the test restart through (test=true) and later calls
// are refused until it resolves. retryAt is when to ask again (zero: when
// the test restart resolves).
func (s *Set) Allow(now time.Time) (ok, test bool, retryAt time.Time) {
	switch s.State() {
	case Open:
		return false, false, s.OpenUntil()
	case HalfOpen:
		if s.testing {
			return false, false, time.Time{}
		}
		s.testing = true
		return true, true, time.Time{}
	}
	return true, false, time.Time{}
}

// Abandon ends a test restart that was stopped on request before it could
// prove anything: the breaker stays half-open and the next start is the
// test.
func (s *Set) Abandon() { s.testing = false }

// Reset closes every breaker and clears all counts and open times.
func (s *Set) Reset(now time.Time) []Transition {
	var out []Transition
	for _, c := range allClasses() {
		b := s.b[c]
		if b.state != Closed {
			out = append(out, s.change(c, Closed, now))
		}
		b.failures, b.openFor = 0, s.p.Open
	}
	s.testing = false
	return out
}

// State is the pool's breaker state: open if any breaker is open, else
// half-open if any is, else closed.
func (s *Set) State() State {
	st := Closed
	for _, b := range s.b {
		if b.state == Open {
			return Open
		}
		if b.state == HalfOpen {
			st = HalfOpen
		}
	}
	return st
}

// Class returns the state and failure count of one breaker.
func (s *Set) Class(c crash.Class) (State, int) {
	b := s.b[c]
	return b.state, b.failures
}

// OpenUntil is when the last open breaker turns half-open (zero if none is
// open).
func (s *Set) OpenUntil() time.Time {
	var t time.Time
	for _, b := range s.b {
		if u := b.openedAt.Add(b.openFor); b.state == Open && u.After(t) {
			t = u
		}
	}
	return t
}

// OpenFor is how long the class's breaker stays open the next time it opens
// (or stays open now).
func (s *Set) OpenFor(c crash.Class) time.Duration { return s.b[c].openFor }

// Testing reports whether the test restart of a half-open breaker is out.
func (s *Set) Testing() bool { return s.testing }

// NextChange is the earliest time at which Settle would change something,
// given the engine's healthy-since time (zero if none).
func (s *Set) NextChange(healthySince time.Time) time.Time {
	var t time.Time
	earlier := func(u time.Time) {
		if t.IsZero() || u.Before(t) {
			t = u
		}
	}
	for _, b := range s.b {
		switch {
		case b.state == Open:
			earlier(b.openedAt.Add(b.openFor))
		case !healthySince.IsZero() && (b.state == HalfOpen && s.testing || b.state == Closed && b.failures > 0):
			earlier(healthySince.Add(s.p.Stable))
		}
	}
	return t
}

// ClassState is one breaker as persisted.
type ClassState struct {
	State    State         `json:"state"`
	Failures int           `json:"failures"`
	OpenFor  time.Duration `json:"open_for"`
	OpenedAt time.Time     `json:"opened_at,omitzero"`
}

// SetState is a Set as persisted.
type SetState struct {
	Classes map[crash.Class]ClassState `json:"classes"`
	Testing bool                       `json:"testing"`
}

// Save returns what must survive a daemon restart.
func (s *Set) Save() SetState {
	out := SetState{Classes: map[crash.Class]ClassState{}, Testing: s.testing}
	for c, b := range s.b {
		out.Classes[c] = ClassState{State: b.state, Failures: b.failures, OpenFor: b.openFor, OpenedAt: b.openedAt}
	}
	return out
}

// Restore puts back a saved state; unknown classes and impossible values
// are ignored (a state file is input like any other).
func (s *Set) Restore(st SetState) {
	for c, cs := range st.Classes {
		b, ok := s.b[c]
		if !ok || cs.State < Closed || cs.State > HalfOpen || cs.Failures < 0 {
			continue
		}
		b.state, b.failures, b.openedAt = cs.State, cs.Failures, cs.OpenedAt
		b.openFor = min(max(cs.OpenFor, s.p.Open), s.p.OpenMax)
	}
	s.testing = st.Testing && s.State() == HalfOpen
}
