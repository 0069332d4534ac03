package lifecycle

import (
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/witness"
)

const ahead = 250 * time.Millisecond

func withAhead(c *Config) { c.Ahead = ahead }

// crashed brings the pool to Ready and crashes its engine: a restart is
// scheduled after the default backoff.
func crashedAhead(t *testing.T) *pool {
	p := newPool(t, withAhead)
	run := p.ready()
	p.exit(run, exitStatus(3))
	require.Equal(t, Backoff, p.m.State())
	return p
}

func preparedUnit(kind witness.Kind, cause witness.Cause) Event {
	return UnitChanged{Event: witness.Event{Kind: kind, Cause: cause, Invocation: "inv-ahead"}}
}

// The restart's scope is made Ahead before the restart, and the restart
// uses it: the engine itself starts when the backoff ends, not before.
func TestARestartsScopeIsPreparedDuringItsBackoff(t *testing.T) {
	p := crashedAhead(t)
	restart, prep := p.timers[TimerRestart], p.timers[TimerPrepare]
	require.NotZero(t, prep.Gen, "the preparation is armed")
	assert.Equal(t, restart.At.Add(-ahead), prep.At)

	pr, ok := find[Prepare](p.fire(TimerPrepare))
	require.True(t, ok, "Prepare: %v", p.last)
	assert.Equal(t, Prepare{Ref: "m.gguf"}, pr)
	_, staging := find[Stage](p.last)
	assert.False(t, staging, "no start before the backoff ends")
	assert.Equal(t, Backoff, p.m.State())
	p.step(ScopePrepared{Invocation: "inv-ahead"})

	p.fire(TimerRestart)
	require.Equal(t, restart.At, p.now)
	stage, ok := find[Stage](p.last)
	require.True(t, ok)
	p.step(ModelStaged{Run: stage.Run, Staged: staged("m.gguf", "sha256:a")})
	launch, ok := find[Launch](p.last)
	require.True(t, ok)
	assert.True(t, launch.Prepared, "the launch takes the prepared scope")
	_, undone := find[Unprepare](p.last)
	assert.False(t, undone)
	p.step(EngineStarted{Run: launch.Run, PID: 101, Invocation: "inv-ahead"})
	assert.Equal(t, Starting, p.m.State())
	// The next restart prepares anew.
	p.step(Healthy{Run: launch.Run})
	p.exit(launch.Run, exitStatus(3))
	require.NotZero(t, p.timers[TimerPrepare].Gen)
}

// Whatever calls the restart off gives the prepared scope up, and the
// start that follows makes its own.
func TestACalledOffRestartGivesItsPreparedScopeUp(t *testing.T) {
	for _, tc := range []struct {
		name string
		off  func(p *pool)
	}{
		{"a Start", func(p *pool) { p.request(func(id ReqID) Event { return StartRequested{Req: id} }) }},
		{"a Drain", func(p *pool) {
			p.request(func(id ReqID) Event { return DrainRequested{Req: id, Deadline: time.Second} })
		}},
		{"a GPU that needs a reset", func(p *pool) { p.step(GPUUnhealthy{GPU: "GPU-0", Why: "XID 79 on GPU-0"}) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := crashedAhead(t)
			p.fire(TimerPrepare)
			p.step(ScopePrepared{Invocation: "inv-ahead"})
			tc.off(p)
			_, ok := find[Unprepare](p.last)
			require.True(t, ok, "Unprepare: %v", p.last)
			_, armed := p.timers[TimerPrepare]
			assert.False(t, armed)
			if stage, ok := find[Stage](p.last); ok {
				p.step(ModelStaged{Run: stage.Run, Staged: staged("m.gguf", "sha256:a")})
				launch, ok := find[Launch](p.last)
				require.True(t, ok)
				assert.False(t, launch.Prepared)
			}
			// A late report of the given-up scope changes nothing.
			before := p.m.State()
			p.step(ScopePrepared{Invocation: "inv-late"})
			p.step(preparedUnit(witness.Dead, witness.OperatorStop))
			assert.Equal(t, before, p.m.State())
		})
	}
}

// A preparation not yet done is called off as well: nothing is left
// prepared, and the Unprepare reaches the supervisor to give it up when
// it is done.
func TestARestartCalledOffWhilePreparingGivesItUp(t *testing.T) {
	p := crashedAhead(t)
	p.fire(TimerPrepare)
	p.request(func(id ReqID) Event { return DrainRequested{Req: id, Deadline: time.Second} })
	_, ok := find[Unprepare](p.last)
	require.True(t, ok)
	assert.Nil(t, p.m.prepared)
}

// systemctl stop of the prepared scope is an operator's stop of the pool,
// as it is of a running engine: no restart until Start. A scope killed
// otherwise is made again by the restart itself.
func TestTheWitnessOnAPreparedScope(t *testing.T) {
	t.Run("systemctl stop", func(t *testing.T) {
		p := crashedAhead(t)
		p.fire(TimerPrepare)
		p.step(ScopePrepared{Invocation: "inv-ahead"})
		p.step(preparedUnit(witness.Stopping, witness.OperatorStop))
		assert.Equal(t, Stopped, p.m.State())
		assert.Contains(t, p.m.View(p.now).LastError, "stopped by an operator")
		_, ok := find[Unprepare](p.last)
		assert.True(t, ok)
		_, armed := p.timers[TimerRestart]
		assert.False(t, armed, "no restart")
		assert.False(t, p.m.tr.Status(p.now).Pending)
	})
	t.Run("killed", func(t *testing.T) {
		p := crashedAhead(t)
		p.fire(TimerPrepare)
		p.step(ScopePrepared{Invocation: "inv-ahead"})
		p.step(preparedUnit(witness.Dead, witness.NoCause))
		_, ok := find[Unprepare](p.last)
		require.True(t, ok)
		assert.Equal(t, Backoff, p.m.State())
		p.fire(TimerRestart)
		stage, ok := find[Stage](p.last)
		require.True(t, ok, "the restart goes on")
		p.step(ModelStaged{Run: stage.Run, Staged: staged("m.gguf", "sha256:a")})
		launch, _ := find[Launch](p.last)
		assert.False(t, launch.Prepared, "on a scope of its own")
	})
	t.Run("an earlier scope's word", func(t *testing.T) {
		p := crashedAhead(t)
		p.fire(TimerPrepare)
		p.step(ScopePrepared{Invocation: "inv-ahead"})
		p.step(unit(witness.Removed, witness.OperatorStop))
		assert.Equal(t, Backoff, p.m.State())
		assert.NotNil(t, p.m.prepared)
	})
}

// Nothing is prepared without Ahead, nor for a restart too close to make
// a scope in time (it starts on the path, as before).
func TestNoPreparationWithoutTime(t *testing.T) {
	p := newPool(t, nil)
	run := p.ready()
	p.exit(run, killedBy(syscall.SIGSEGV))
	_, armed := p.timers[TimerPrepare]
	assert.False(t, armed, "Ahead is 0")

	// The lead is cut to the time left, down to a fifth of Ahead.
	p = newPool(t, withAhead)
	for _, tc := range []struct {
		in   time.Duration
		want time.Duration // when it is prepared, from now (-1: never)
	}{
		{ahead / 5, 0}, {ahead/5 - time.Millisecond, -1}, {ahead / 2, 0}, {ahead, 0}, {4 * ahead, 3 * ahead},
	} {
		p.m.now, p.m.out = p.now, nil
		p.m.prepareAhead(p.now.Add(tc.in))
		arms := all[ArmTimer](p.m.out)
		if tc.want < 0 {
			assert.Empty(t, arms, "%s", tc.in)
			continue
		}
		require.Len(t, arms, 1, "%s", tc.in)
		assert.Equal(t, TimerPrepare, arms[0].Timer)
		assert.Equal(t, p.now.Add(tc.want), arms[0].At, "%s", tc.in)
	}
}

// Spread stretches the lead up to 4 Ahead, within the time left.
func TestPreparationsAreSpread(t *testing.T) {
	for _, tc := range []struct {
		u     float64
		until time.Duration
		lead  time.Duration
	}{
		{0, 10 * time.Second, ahead}, {0.5, 10 * time.Second, 5 * ahead / 2}, {0.999999, 10 * time.Second, 4 * ahead},
		{0.5, 2 * ahead, 2 * ahead},
	} {
		p := newPool(t, func(c *Config) { c.Ahead, c.Spread = ahead, func() float64 { return tc.u } })
		p.m.now, p.m.out = p.now, nil
		p.m.prepareAhead(p.now.Add(tc.until))
		arms := all[ArmTimer](p.m.out)
		require.Len(t, arms, 1)
		assert.InDelta(t, float64(tc.lead), float64(p.now.Add(tc.until).Sub(arms[0].At)), float64(time.Millisecond), "u=%v until=%s", tc.u, tc.until)
	}
}

// systemctl stop of the prepared scope while the restart that uses it
// stages its model: the restart is called off with it.
func TestAnOperatorStopOfThePreparedScopeCallsOffItsRestart(t *testing.T) {
	p := crashedAhead(t)
	p.fire(TimerPrepare)
	p.step(ScopePrepared{Invocation: "inv-ahead"})
	p.fire(TimerRestart)
	stage, ok := find[Stage](p.last)
	require.True(t, ok, "the restart stages its model")
	require.Equal(t, Starting, p.m.State())

	p.step(preparedUnit(witness.Stopping, witness.OperatorStop))
	assert.Equal(t, Stopped, p.m.State())
	p.step(ModelStaged{Run: stage.Run, Staged: staged("m.gguf", "sha256:a")})
	_, launched := find[Launch](p.last)
	assert.False(t, launched, "no engine starts")
	assert.Equal(t, Stopped, p.m.State())
	assert.Equal(t, "", p.m.View(p.now).Operation)
}
