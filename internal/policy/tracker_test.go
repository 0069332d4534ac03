package policy

import (
	"encoding/json"
	"errors"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/breaker"
	"github.com/llorch/pool-managerd/internal/crash"
	"github.com/llorch/pool-managerd/internal/storm"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func half() float64 { return 0.5 } // no jitter: the middle of the band

func TestStoppedCancelsPendingRestart(t *testing.T) {
	tr := New(Defaults(), half)
	d := tr.Crash(t0, crash.ExitCode)
	require.False(t, d.Held)
	tr.Stopped(t0.Add(100 * time.Millisecond))
	_, err := tr.Restart(d.At)
	assert.ErrorIs(t, err, ErrNoRestartPending)
	_, err = tr.AllowRestart(d.At)
	assert.ErrorIs(t, err, ErrNoRestartPending)
	assert.False(t, tr.Status(d.At).Pending)
}

func TestRestartWithoutCrash(t *testing.T) {
	tr := New(Defaults(), half)
	_, err := tr.Restart(t0)
	assert.ErrorIs(t, err, ErrNoRestartPending)
	assert.Zero(t, tr.Status(t0).RestartCount)
}

func TestHeldUntilBreakerAndWindowAllow(t *testing.T) {
	p := Defaults()
	p.Breaker.Open = 10 * time.Second
	p.Breaker.OpenMax = 10 * time.Second
	p.Breaker.Threshold = 100
	p.Backoff.Initial, p.Backoff.Min, p.Backoff.Max = time.Second, time.Second, time.Second
	tr := New(p, half)
	now := t0
	var first time.Time
	for i := range 10 {
		d := tr.Crash(now, crash.ExitCode)
		require.False(t, d.Held, "crash %d", i)
		now = d.At
		_, err := tr.Restart(now)
		require.NoError(t, err)
		if first.IsZero() {
			first = now
		}
	}
	d := tr.Crash(now, crash.ExitCode)
	require.True(t, d.Held)
	// The breaker alone would allow a test at now+10s; the window at first+60s.
	assert.Equal(t, first.Add(60*time.Second), d.At)
	assert.Equal(t, breaker.Open, tr.Status(now).Breaker)

	var r *Refusal
	_, err := tr.Restart(now.Add(30 * time.Second))
	require.True(t, errors.As(err, &r))
	assert.Equal(t, "restart storm limit reached", r.Why)
	assert.Equal(t, first.Add(60*time.Second), r.RetryAt)

	pm, err := tr.Restart(d.At)
	require.NoError(t, err)
	assert.True(t, pm.Test, "the first restart after the hold is the breaker's test")
}

func TestNextTick(t *testing.T) {
	tr := New(Defaults(), half)
	assert.True(t, tr.NextTick().IsZero(), "nothing to wait for")
	d := tr.Crash(t0, crash.ExitCode)
	_, err := tr.Restart(d.At)
	require.NoError(t, err)
	up := d.At.Add(5 * time.Second)
	tr.Healthy(up)
	// The restart leaves the storm window after 60 s, the breaker's count
	// clears 60 s after the engine is up, the backoff after 300 s, the
	// restart count after 600 s: each is a tick.
	assert.Equal(t, d.At.Add(60*time.Second), tr.NextTick())
	tr.Tick(d.At.Add(60 * time.Second))
	assert.Equal(t, up.Add(60*time.Second), tr.NextTick())
	tr.Tick(up.Add(60 * time.Second))
	assert.Equal(t, up.Add(300*time.Second), tr.NextTick())
	ev := tr.Tick(up.Add(300 * time.Second))
	require.Len(t, ev, 1)
	assert.Equal(t, Recovered{What: "backoff", Stable: 300 * time.Second}, ev[0])
	assert.Equal(t, up.Add(600*time.Second), tr.NextTick())
	ev = tr.Tick(up.Add(600 * time.Second))
	require.Len(t, ev, 1)
	assert.Equal(t, "restart_count", ev[0].(Recovered).What)
	assert.True(t, tr.NextTick().IsZero())
	assert.Equal(t, uint64(1), tr.Status(up).CrashCount, "crash count is history and never resets")
}

func TestHealthyTwiceKeepsFirstTime(t *testing.T) {
	tr := New(Defaults(), half)
	d := tr.Crash(t0, crash.ExitCode)
	_, _ = tr.Restart(d.At)
	tr.Healthy(d.At)
	tr.Healthy(d.At.Add(200 * time.Second))
	tr.Tick(d.At.Add(300 * time.Second))
	assert.Zero(t, tr.Status(d.At).Streak)
}

func TestSameSeedSameSchedule(t *testing.T) {
	run := func() []time.Duration {
		tr := New(Defaults(), rand.New(rand.NewPCG(1, 2)).Float64)
		var out []time.Duration
		now := t0
		for range 4 {
			d := tr.Crash(now, crash.Signal)
			out = append(out, d.Delay)
			now = d.At
			_, _ = tr.Restart(now)
		}
		return out
	}
	a, b := run(), run()
	assert.Equal(t, a, b)
	assert.NotEqual(t, []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second}, a, "jitter moved the delays")
}

func TestValidateJoinsErrors(t *testing.T) {
	p := Defaults()
	p.Backoff.Initial = 0
	p.Breaker.Threshold = 0
	p.Storm.Max = 0
	p.RestartCountReset = 0
	err := p.Validate()
	require.Error(t, err)
	for _, s := range []string{"backoff:", "circuit breaker:", "restart storm:", "restart count reset"} {
		assert.Contains(t, err.Error(), s)
	}
}

func TestSaveRestoreKeepsBreakerAndCounters(t *testing.T) {
	tr := New(Defaults(), half)
	now := t0
	for range 5 {
		d := tr.Crash(now, crash.CUDAError)
		if d.Held {
			break
		}
		now = d.At
		_, err := tr.Restart(now)
		require.NoError(t, err)
	}
	saved := tr.Save()
	b, err := json.Marshal(saved)
	require.NoError(t, err)
	var back State
	require.NoError(t, json.Unmarshal(b, &back))

	fresh := New(Defaults(), half)
	fresh.Restore(back)
	assert.Equal(t, tr.Status(now), fresh.Status(now))
	assert.Equal(t, breaker.Open, fresh.Status(now).Breakers[crash.ClassCUDA].State)
	_, err = fresh.Restart(now)
	var r *Refusal
	require.ErrorAs(t, err, &r, "a daemon restart is no way around the breaker")
	// Both see time pass alike; the breaker turns half-open at the same
	// moment in each.
	for range 20 {
		next := tr.NextTick()
		require.False(t, next.IsZero())
		require.Equal(t, next, fresh.NextTick())
		tr.Tick(next)
		fresh.Tick(next)
		if tr.Status(next).Breaker != breaker.Open {
			break
		}
	}
	assert.Equal(t, breaker.HalfOpen, tr.Status(tr.NextTick()).Breaker)
	assert.Equal(t, breaker.HalfOpen, fresh.Status(tr.NextTick()).Breaker, "the open time runs on across the restart")
}

// openBreaker crashes a pool until its breaker opens, then stops it on
// request, as a drain or Stop does: no restart is pending any more.
func openBreaker(t *testing.T) (*Tracker, time.Time) {
	t.Helper()
	p := Defaults()
	p.Breaker.Threshold = 2
	tr := New(p, half)
	now := t0
	d := tr.Crash(now, crash.ExitCode)
	now = d.At
	_, err := tr.Restart(now)
	require.NoError(t, err)
	now = now.Add(time.Second)
	require.True(t, tr.Crash(now, crash.ExitCode).Held)
	require.Equal(t, breaker.Open, tr.Status(now).Breaker)
	tr.Stopped(now)
	require.False(t, tr.Status(now).Pending)
	return tr, now
}

func TestStopThenStartDoesNotBypassOpenBreaker(t *testing.T) {
	tr, now := openBreaker(t)
	_, err := tr.Start(now)
	var r *Refusal
	require.ErrorAs(t, err, &r)
	assert.Equal(t, "circuit breaker open", r.Why)
	assert.False(t, r.RetryAt.IsZero())
	assert.Equal(t, breaker.Open, tr.Status(now).Breaker)
}

func TestStartOfStoppedPoolWithOpenBreakerNeedsAllowRestart(t *testing.T) {
	tr, now := openBreaker(t)
	_, err := tr.AllowRestart(now)
	require.NoError(t, err)
	p, err := tr.Start(now)
	require.NoError(t, err)
	assert.True(t, p.Override)
	_, err = tr.Start(now)
	assert.Error(t, err, "an override lets one start through, not two")
	assert.Equal(t, uint64(1), tr.Status(now).RestartCount, "a start on request is not counted as a restart")
}

func TestStartOfHalfOpenBreakerIsItsTest(t *testing.T) {
	tr, now := openBreaker(t)
	later := now.Add(tr.OpenFor(crash.ClassGeneral) + time.Second)
	p, err := tr.Start(later)
	require.NoError(t, err)
	assert.True(t, p.Test)
	_, err = tr.Start(later)
	assert.Error(t, err, "one test at a time")
	// The operator stops the test engine before it proved itself: the
	// next start is the test.
	tr.Stopped(later.Add(time.Second))
	p, err = tr.Start(later.Add(2 * time.Second))
	require.NoError(t, err)
	assert.True(t, p.Test)
}

func TestStartWithClosedBreaker(t *testing.T) {
	tr := New(Defaults(), half)
	p, err := tr.Start(t0)
	require.NoError(t, err)
	assert.False(t, p.Test || p.Override)
	assert.Zero(t, tr.Status(t0).RestartCount)
}

func TestStateCheckRefusesImpossibleValues(t *testing.T) {
	good := New(Defaults(), half)
	good.Crash(t0, crash.CUDAError)
	require.NoError(t, good.Save().Check())
	for name, mutate := range map[string]func(*State){
		"negative streak": func(s *State) { s.Streak = -1 },
		"unknown reason":  func(s *State) { s.LastReason = "gremlins" },
		"unknown class": func(s *State) {
			s.Breakers.Classes["nope"] = breaker.ClassState{}
		},
		"impossible breaker state": func(s *State) {
			s.Breakers.Classes[crash.ClassGeneral] = breaker.ClassState{State: 7}
		},
		"negative failures": func(s *State) {
			s.Breakers.Classes[crash.ClassCUDA] = breaker.ClassState{Failures: -3}
		},
	} {
		t.Run(name, func(t *testing.T) {
			st := good.Save()
			mutate(&st)
			assert.Error(t, st.Check())
		})
	}
}

// The restart rate falls as each restart leaves the storm window, with no
// other event: NextTick wakes the owner for it, and Tick brings the rate
// down.
func TestNextTickIncludesRestartLeavingStormWindow(t *testing.T) {
	p := Defaults()
	p.Storm.Window = 10 * time.Second
	tr := New(p, half)
	d := tr.Crash(t0, crash.ExitCode)
	first := d.At
	_, err := tr.Restart(first)
	require.NoError(t, err)
	d = tr.Crash(first.Add(2*time.Second), crash.ExitCode)
	second := d.At
	_, err = tr.Restart(second)
	require.NoError(t, err)
	up := second.Add(time.Second)
	tr.Healthy(up)
	require.Equal(t, 2, tr.Status(up).RestartRate)

	assert.Equal(t, first.Add(10*time.Second), tr.NextTick(), "the first restart leaves the window")
	tr.Tick(tr.NextTick())
	assert.Equal(t, 1, tr.Status(first.Add(10*time.Second)).RestartRate)
	assert.Equal(t, second.Add(10*time.Second), tr.NextTick(), "then the second")
	tr.Tick(tr.NextTick())
	assert.Equal(t, 0, tr.Status(second.Add(10*time.Second)).RestartRate)
	assert.Equal(t, up.Add(60*time.Second), tr.NextTick(), "then the breaker's stable period")

	// Restarts restored from disk long after they left the window do not
	// make the owner tick over and over: one tick forgets them.
	restored := New(p, half)
	saved := tr.Save()
	saved.Restarts = []storm.Restart{{At: first, Reason: crash.ExitCode}, {At: second, Reason: crash.ExitCode}}
	restored.Restore(saved)
	later := second.Add(time.Hour)
	restored.Tick(later)
	next := restored.NextTick()
	assert.True(t, next.IsZero() || next.After(later), "next tick %s is after %s", next, later)
	assert.Equal(t, 0, restored.Status(later).RestartRate)
}
