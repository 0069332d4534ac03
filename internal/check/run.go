package check

import (
	"context"
	"fmt"
	"time"

	"github.com/llorch/pool-managerd/internal/lifecycle"
)

// Run is the checks of one engine run.
type Run struct {
	ctx    context.Context
	target Target
	tell   func(lifecycle.Event)
	// byName: every check of the run, for Trigger.
	byName map[string]Check
}

// Start makes the run's checks of every kind its pool asks for and starts
// each periodic or following one in its own goroutine; they end when ctx
// does. startBy, when set, is when the run must be up (else StartTimeout
// from now). tell gets the events of every look, in the order each check
// made them; nothing is told once ctx has ended.
func Start(ctx context.Context, kinds []Kind, cfg Config, t Target, startBy time.Time, tell func(lifecycle.Event)) *Run {
	checks := map[string]Check{}
	r := &Run{ctx: ctx, target: t, tell: tell, byName: checks}
	var names []string
	for _, k := range kinds {
		if c := k.New(cfg); c != nil {
			checks[k.Name] = c
			names = append(names, k.Name)
		}
	}
	followers := map[string][]chan chan struct{}{}
	for _, name := range names {
		c := checks[name]
		s := c.Schedule()
		switch {
		case s.OnDemand:
			// Only Trigger runs it.
		case s.After != "":
			next := make(chan chan struct{})
			followers[s.After] = append(followers[s.After], next)
			go r.follow(c, next)
		}
	}
	for _, name := range names {
		c := checks[name]
		if s := c.Schedule(); s.Every > 0 {
			go r.periodic(c, s, startBy, followers[name])
		}
	}
	return r
}

// Trigger has the check of kind name look once, now, in its own
// goroutine: an on-demand check's only looks, or one more look of a
// scheduled one (a drain reads the engine's requests in flight at once).
// A kind the pool does not have: nothing.
func (r *Run) Trigger(name string) {
	if c := r.byName[name]; c != nil {
		go r.look(c)
	}
}

// look looks once and tells what it found.
func (r *Run) look(c Check) Result {
	res := c.Check(r.ctx, r.target)
	if r.ctx.Err() != nil {
		return Result{Err: r.ctx.Err()}
	}
	if res.Beat && r.target.Beat != nil {
		r.target.Beat(time.Now())
	}
	for _, ev := range res.Events {
		r.tell(ev)
	}
	return res
}

// periodic looks often until a look has no error (bounded by the start's
// deadline), then every s.Every on the shared grid; each look without
// error after the start has the followers look, and the next look waits
// for theirs.
func (r *Run) periodic(c Check, s Schedule, startBy time.Time, followers []chan chan struct{}) {
	startEvery := min(s.Every, startEvery)
	next := min(startStep, startEvery)
	quickUntil := time.Now().Add(startQuick)
	deadline := time.Now().Add(s.StartTimeout)
	if !startBy.IsZero() {
		deadline = startBy
	}
	up := s.StartTimeout == 0
	for {
		wait := next
		if time.Now().After(quickUntil) {
			next = min(2*next, startEvery)
		}
		if up {
			wait = untilProbe(time.Now(), s.Every)
		}
		select {
		case <-r.ctx.Done():
			return
		case <-time.After(wait):
		}
		res := r.look(c)
		if r.ctx.Err() != nil {
			return
		}
		if !up {
			if res.Err == nil {
				up = true
			} else if time.Now().After(deadline) {
				err := fmt.Errorf("not healthy within StartTimeoutSec=%s: %w", s.StartTimeout, res.Err)
				r.tell(lifecycle.StartTimedOut{Run: r.target.Run, Err: err})
				return
			}
			continue
		}
		if res.Err != nil {
			continue
		}
		for _, f := range followers {
			done := make(chan struct{})
			select {
			case f <- done:
			case <-r.ctx.Done():
				return
			}
			select {
			case <-done:
			case <-r.ctx.Done():
				return
			}
		}
	}
}

// follow looks each time the check it follows asks, and says when done.
func (r *Run) follow(c Check, next <-chan chan struct{}) {
	for {
		var done chan struct{}
		select {
		case <-r.ctx.Done():
			return
		case done = <-next:
		}
		r.look(c)
		close(done)
	}
}
