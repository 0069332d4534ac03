package check

import (
	"context"
	"errors"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/lifecycle"
)

// fake is a check whose looks fail while fail says so; each look is told
// as a Probed carrying the look's number in Err's text.
type fake struct {
	sched Schedule
	fail  func(n int) bool
	mu    sync.Mutex
	looks []time.Time
}

func (f *fake) Schedule() Schedule { return f.sched }

func (f *fake) Check(_ context.Context, t Target) Result {
	f.mu.Lock()
	f.looks = append(f.looks, time.Now())
	n := len(f.looks)
	f.mu.Unlock()
	var err error
	if f.fail != nil && f.fail(n) {
		err = errors.New("down")
	}
	return Result{Err: err, Events: []lifecycle.Event{lifecycle.Probed{Run: t.Run, Err: err}}}
}

func (f *fake) times() []time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]time.Time(nil), f.looks...)
}

// told collects what the checks tell, for a test to wait on.
type told struct {
	mu  sync.Mutex
	evs []lifecycle.Event
}

func (t *told) tell(ev lifecycle.Event) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.evs = append(t.evs, ev)
}

func (t *told) events() []lifecycle.Event {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]lifecycle.Event(nil), t.evs...)
}

func kinds(cs map[string]Check) []Kind {
	var ks []Kind
	for _, name := range []string{"gate", "follower", "demand", "absent"} {
		c := cs[name]
		ks = append(ks, Kind{Name: name, New: func(Config) Check { return c }})
	}
	return ks
}

// workers counts the goroutines of runs' checks: those the check package
// started.
func workers() int {
	buf := make([]byte, 1<<20)
	n := 0
	for g := range strings.SplitSeq(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
		if strings.Contains(g, "\ncreated by github.com/llorch/pool-managerd/internal/check.") {
			n++
		}
	}
	return n
}

// settled waits until no check's goroutine is left: a run's checks end
// with its context.
func settled(t *testing.T) {
	t.Helper()
	assert.Eventually(t, func() bool { return workers() == 0 }, 5*time.Second, 5*time.Millisecond, "the checks' goroutines end")
}

// A starting engine is looked at every 2 ms, then at doubling waits up to
// 100 ms; its first good look ends the start and later looks fall on the
// shared grid of the interval.
func TestStartIsQuickThenLooksFallOnTheGrid(t *testing.T) {
	every := 100 * time.Millisecond
	gate := &fake{sched: Schedule{Every: every, StartTimeout: 10 * time.Second}, fail: func(n int) bool { return n <= 12 }}
	var got told
	ctx, cancel := context.WithCancel(context.Background())
	Start(ctx, kinds(map[string]Check{"gate": gate}), Config{}, Target{Run: 7}, time.Time{}, got.tell)
	require.Eventually(t, func() bool { return len(gate.times()) >= 17 }, 10*time.Second, time.Millisecond)
	cancel()
	settled(t)

	looks := gate.times()
	// The start: 2 ms steps while quick, then doubling, capped at
	// min(every, 100 ms); the 13th look is the first good one.
	for i := 1; i < 13; i++ {
		gap := looks[i].Sub(looks[i-1])
		assert.GreaterOrEqual(t, gap, startStep, "start look %d", i)
		assert.LessOrEqual(t, gap, every+20*time.Millisecond, "start look %d", i)
	}
	for i, at := range looks[13:] {
		off := at.Sub(probeEpoch) % every
		assert.True(t, off < 40*time.Millisecond, "look %d after the start is on the grid (%v past it)", 13+i, off)
	}
	evs := got.events()
	require.GreaterOrEqual(t, len(evs), 17)
	for _, ev := range evs {
		assert.Equal(t, lifecycle.RunID(7), ev.(lifecycle.Probed).Run)
	}
}

// A gate with no good look by its deadline is told as StartTimedOut, with
// the last look's error, and looks no more; the run's own deadline
// (startBy) replaces StartTimeout.
func TestStartTimesOut(t *testing.T) {
	for _, tc := range []struct {
		name    string
		timeout time.Duration
		startBy time.Duration
	}{
		{"StartTimeout", 60 * time.Millisecond, 0},
		{"the run's deadline", time.Hour, 60 * time.Millisecond},
	} {
		gate := &fake{sched: Schedule{Every: time.Second, StartTimeout: tc.timeout}, fail: func(int) bool { return true }}
		var got told
		ctx, cancel := context.WithCancel(context.Background())
		start := time.Now()
		var startBy time.Time
		if tc.startBy > 0 {
			startBy = start.Add(tc.startBy)
		}
		Start(ctx, kinds(map[string]Check{"gate": gate}), Config{}, Target{Run: 3}, startBy, got.tell)
		require.Eventually(t, func() bool {
			evs := got.events()
			return len(evs) > 0 && isTimeout(evs[len(evs)-1])
		}, 5*time.Second, time.Millisecond, tc.name)
		assert.GreaterOrEqual(t, time.Since(start), 60*time.Millisecond, tc.name)
		n := len(gate.times())
		time.Sleep(150 * time.Millisecond)
		assert.Equal(t, n, len(gate.times()), "%s: no look after the time-out", tc.name)
		evs := got.events()
		to := evs[len(evs)-1].(lifecycle.StartTimedOut)
		assert.Equal(t, lifecycle.RunID(3), to.Run)
		assert.EqualError(t, to.Err, "not healthy within StartTimeoutSec="+tc.timeout.String()+": down", tc.name)
		for _, ev := range evs[:len(evs)-1] {
			assert.IsType(t, lifecycle.Probed{}, ev, "each look's own events come first")
		}
		cancel()
	}
	settled(t)
}

func isTimeout(ev lifecycle.Event) bool { _, ok := ev.(lifecycle.StartTimedOut); return ok }

// A follower looks after each good look of its check once the engine is
// up: not after the start's looks, not after a failed one; its events
// come after those of the look it follows.
func TestFollowerLooksAfterEachGoodLookOnceUp(t *testing.T) {
	// Looks 1-2 fail (the start), 3 is the first good one, 5 and 6 fail.
	gate := &fake{sched: Schedule{Every: 20 * time.Millisecond, StartTimeout: time.Minute}, fail: func(n int) bool { return n <= 2 || n == 5 || n == 6 }}
	follower := &follows{after: "gate"}
	var got told
	ctx, cancel := context.WithCancel(context.Background())
	Start(ctx, kinds(map[string]Check{"gate": gate, "follower": follower}), Config{}, Target{Run: 1}, time.Time{}, got.tell)
	assert.Equal(t, 2, workers(), "one goroutine per check")
	require.Eventually(t, func() bool { return len(gate.times()) >= 9 }, 5*time.Second, time.Millisecond)
	cancel()
	settled(t)

	// Looks 4, 7, 8 (and maybe 9) are good and after the start.
	var seq []string
	for _, ev := range got.events() {
		switch ev := ev.(type) {
		case lifecycle.Probed:
			if ev.Err != nil {
				seq = append(seq, "bad")
			} else {
				seq = append(seq, "good")
			}
		case lifecycle.Progress:
			seq = append(seq, "follow")
		}
	}
	require.GreaterOrEqual(t, len(seq), 11)
	assert.Equal(t, []string{"bad", "bad", "good", "good", "follow", "bad", "bad", "good", "follow", "good", "follow"}, seq[:11])
}

// follows is a follower: each look is told as Progress.
type follows struct{ after string }

func (f *follows) Schedule() Schedule { return Schedule{After: f.after} }

func (f *follows) Check(_ context.Context, t Target) Result {
	return Result{Events: []lifecycle.Event{lifecycle.Progress{Run: t.Run}}}
}

// An on-demand check looks once per asking, never on its own; asking for
// a kind the pool lacks does nothing; nothing is told once the run's
// context has ended.
func TestOnDemandLooksWhenAsked(t *testing.T) {
	demand := &fake{sched: Schedule{OnDemand: true}}
	var got told
	ctx, cancel := context.WithCancel(context.Background())
	r := Start(ctx, kinds(map[string]Check{"demand": demand}), Config{}, Target{Run: 2}, time.Time{}, got.tell)
	assert.Zero(t, workers(), "an on-demand check waits in no goroutine")
	time.Sleep(30 * time.Millisecond)
	assert.Empty(t, demand.times(), "no look before it is asked for")
	r.Trigger("absent")
	r.Trigger("demand")
	require.Eventually(t, func() bool { return len(got.events()) == 1 }, 5*time.Second, time.Millisecond)
	assert.Equal(t, lifecycle.Probed{Run: 2}, got.events()[0])
	settled(t)
	cancel()
	r.Trigger("demand")
	require.Eventually(t, func() bool { return len(demand.times()) == 2 }, 5*time.Second, time.Millisecond)
	settled(t)
	assert.Len(t, got.events(), 1, "a look after the run's end tells nothing")
}

// slow is a follower whose looks take a while.
type slow struct {
	took time.Duration
	n    atomic.Int32
}

func (s *slow) Schedule() Schedule { return Schedule{After: "gate"} }

func (s *slow) Check(context.Context, Target) Result {
	time.Sleep(s.took)
	s.n.Add(1)
	return Result{}
}

// The followed check's next look waits for its followers' looks, as when
// one loop made both: a slow metrics read delays the next probe to the
// grid point after it, and no read is queued or skipped.
func TestNextLookWaitsForTheFollowers(t *testing.T) {
	every := 20 * time.Millisecond
	gate := &fake{sched: Schedule{Every: every, StartTimeout: time.Minute}}
	follower := &slow{took: 5 * every}
	ctx, cancel := context.WithCancel(context.Background())
	Start(ctx, kinds(map[string]Check{"gate": gate, "follower": follower}), Config{}, Target{}, time.Time{}, func(lifecycle.Event) {})
	require.Eventually(t, func() bool { return len(gate.times()) >= 5 }, 10*time.Second, time.Millisecond)
	cancel()
	settled(t)
	looks := gate.times()
	// Look 1 ends the start; looks 2, 3, ... are each followed by a read.
	for i := 2; i < len(looks); i++ {
		assert.GreaterOrEqual(t, looks[i].Sub(looks[i-1]), follower.took, "look %d waited for the read after look %d", i+1, i)
	}
	assert.Contains(t, []int32{int32(len(looks) - 1), int32(len(looks) - 2)}, follower.n.Load(), "one read per good look after the start")
}

// A scheduled check looks once more when asked (a drain reads the
// engine's requests in flight at once), besides its own looks.
func TestAScheduledCheckLooksOnceMoreWhenAsked(t *testing.T) {
	gate := &fake{sched: Schedule{Every: time.Hour}, fail: func(int) bool { return true }}
	follower := &fake{sched: Schedule{After: "gate"}}
	var got told
	ctx, cancel := context.WithCancel(context.Background())
	defer settled(t)
	defer cancel()
	r := Start(ctx, kinds(map[string]Check{"gate": gate, "follower": follower}), Config{}, Target{Run: 3}, time.Now().Add(time.Hour), got.tell)
	time.Sleep(30 * time.Millisecond)
	assert.Empty(t, follower.times(), "a follower of a failing check has not looked")
	r.Trigger("follower")
	require.Eventually(t, func() bool { return len(follower.times()) == 1 }, 5*time.Second, time.Millisecond)
}
