package lifecycle

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func idlePool(t *testing.T, mod func(*Config)) *pool {
	return newPool(t, func(c *Config) {
		c.IdleStop = time.Minute
		c.StartOnLease = true
		c.WakeTimeout = 30 * time.Second
		if mod != nil {
			mod(c)
		}
	})
}

// goneIdle fires the idle timer of a ready pool and ends its engine.
func (p *pool) goneIdle(run RunID) {
	p.t.Helper()
	acts := p.fire(TimerIdle)
	stop, ok := find[StopScope](acts)
	require.True(p.t, ok, "the idle engine is stopped: %v", acts)
	require.Equal(p.t, run, stop.Run)
	_, counted := find[CountIdleStop](acts)
	require.True(p.t, counted)
	require.Equal(p.t, Idle, p.m.State())
	p.exit(run, killedBy(15))
	require.Equal(p.t, Idle, p.m.State())
}

// A ready pool unused for IdleStopSec stops its engine and is Idle: no
// crash, no restart, its IdleSince set, its reason journaled.
func TestUnusedPoolGoesIdle(t *testing.T) {
	p := idlePool(t, nil)
	run := p.ready()
	require.Contains(t, p.timers, TimerIdle)
	assert.Equal(t, p.now.Add(time.Minute), p.timers[TimerIdle].At)
	// Health probes are no use.
	for range 5 {
		p.advance(10 * time.Second)
		p.step(Probed{Run: run})
		p.step(Progress{Run: run, InFlight: 0, Tokens: 5})
	}
	acts := p.fire(TimerIdle)
	at := p.now
	logged := false
	for _, l := range all[Log](acts) {
		if l.Msg == "pool idle: engine stopped to give its GPUs back" {
			logged = true
			assert.Contains(t, l.Attrs, "idle")
		}
	}
	assert.True(t, logged, "the idle stop is journaled: %v", acts)
	v := p.m.View(p.now)
	assert.Equal(t, Idle, v.State)
	assert.False(t, v.Ready)
	assert.Equal(t, at, v.IdleSince)
	p.advance(time.Second)
	p.exit(run, killedBy(9))
	v = p.m.View(p.now)
	assert.Equal(t, Idle, v.State)
	assert.Zero(t, v.Policy.CrashCount)
	assert.True(t, v.NextRestart.IsZero())
	assert.NotContains(t, p.timers, TimerRestart)
	assert.Equal(t, at, v.IdleSince)
}

// A lease held, given back, or a request in flight in the engine is use:
// the idle time runs from its end.
func TestUsePostponesIdle(t *testing.T) {
	p := idlePool(t, func(c *Config) { c.Stall = time.Hour; c.DrainRequests = true })
	run := p.ready()
	p.advance(50 * time.Second)
	id, err := p.lease("a")
	require.NoError(t, err)
	p.fire(TimerIdle)
	assert.Equal(t, Ready, p.m.State(), "a lease held keeps it up")
	p.advance(10 * time.Minute)
	p.request(func(r ReqID) Event { return LeaseReleased{Req: r, ID: id} })
	assert.Equal(t, p.now.Add(time.Minute), p.timers[TimerIdle].At, "the idle time runs from the release")

	p.advance(30 * time.Second)
	p.step(Progress{Run: run, InFlight: 2, Tokens: 10})
	p.advance(40 * time.Second)
	p.step(Progress{Run: run, InFlight: 1, Tokens: 20})
	p.fire(TimerIdle)
	assert.Equal(t, Ready, p.m.State(), "requests in flight keep it up")
	p.advance(5 * time.Second)
	p.step(Progress{Run: run, InFlight: 0, Tokens: 30})
	last := p.now
	assert.Equal(t, last.Add(time.Minute), p.timers[TimerIdle].At)
	// A metrics endpoint that cannot say keeps it up too.
	p.step(Progress{Run: run, Err: errors.New("refused")})
	p.fire(TimerIdle)
	assert.Equal(t, Ready, p.m.State())
	p.step(Progress{Run: run, InFlight: 0, Tokens: 30})
	p.goneIdle(run)
}

// Pin= (IdleStop 0) keeps a pool up.
func TestPinnedPoolStaysUp(t *testing.T) {
	p := newPool(t, func(c *Config) { c.StartOnLease = true })
	p.ready()
	assert.NotContains(t, p.timers, TimerIdle)
	_, err := p.lease("a")
	assert.NoError(t, err)
	assert.NotContains(t, p.timers, TimerIdle)
}

// Leases asked of an idle pool share one start and are all granted once
// it is Ready.
func TestLeasesOnIdleShareOneStart(t *testing.T) {
	p := idlePool(t, nil)
	run := p.ready()
	p.goneIdle(run)
	var reqs []ReqID
	stages := 0
	for i := range 5 {
		id := "p/l" + string(rune('a'+i))
		reqs = append(reqs, p.request(func(r ReqID) Event { return LeaseRequested{Req: r, ID: id, Owner: "o"} }))
		stages += len(all[Stage](p.last))
		p.noReply(reqs[i])
		if i == 0 {
			_, counted := find[CountLeaseStart](p.last)
			assert.True(t, counted)
		}
	}
	assert.Equal(t, 1, stages, "one start for all")
	assert.Equal(t, Starting, p.m.State())
	assert.True(t, p.m.View(p.now).IdleSince.IsZero())
	p.step(ModelStaged{Run: p.m.start.run, Staged: staged("m.gguf", "sha256:a")})
	launch, _ := find[Launch](p.last)
	p.step(EngineStarted{Run: launch.Run, PID: 7})
	for _, r := range reqs {
		p.noReply(r)
	}
	p.step(Healthy{Run: launch.Run})
	for _, r := range reqs {
		rep := p.reply(r)
		require.NoError(t, rep.Err)
		assert.NotEmpty(t, rep.Lease)
	}
	assert.Equal(t, uint32(5), p.m.View(p.now).ActiveLeases)
	assert.Zero(t, p.m.View(p.now).Policy.CrashCount)
}

// A start that fails answers NotReady to every caller, and a lease
// without StartOnLease is NotReady naming how to bring the pool back.
func TestFailedWakeAnswersNotReady(t *testing.T) {
	p := idlePool(t, nil)
	run := p.ready()
	p.goneIdle(run)
	a := p.request(func(r ReqID) Event { return LeaseRequested{Req: r, ID: "p/a", Owner: "o"} })
	b := p.request(func(r ReqID) Event { return EnsureReadyRequested{Req: r} })
	p.step(ModelStaged{Run: p.m.start.run, Err: errors.New("model gone")})
	for _, r := range []ReqID{a, b} {
		err := p.reply(r).Err
		assert.ErrorIs(t, err, ErrNotReady)
		assert.Contains(t, err.Error(), "model gone")
	}
	assert.NotContains(t, p.timers, TimerWake)

	q := newPool(t, func(c *Config) { c.IdleStop = time.Minute })
	run = q.ready()
	q.goneIdle(run)
	_, err := q.lease("o")
	assert.ErrorIs(t, err, ErrNotReady)
	assert.Contains(t, err.Error(), "EnsureReady")
	assert.Empty(t, all[Stage](q.last), "nothing starts")
}

// A caller that waits too long gets NotReady; the start goes on for the
// others. Waiters are bounded.
func TestWakeWaitsAreBounded(t *testing.T) {
	p := idlePool(t, nil)
	run := p.ready()
	p.goneIdle(run)
	short := p.request(func(r ReqID) Event { return EnsureReadyRequested{Req: r, Timeout: time.Second} })
	var long []ReqID
	for len(long) < MaxWaiters-1 {
		long = append(long, p.request(func(r ReqID) Event { return EnsureReadyRequested{Req: r} }))
	}
	over := p.request(func(r ReqID) Event { return EnsureReadyRequested{Req: r} })
	err := p.reply(over).Err
	assert.ErrorIs(t, err, ErrBusy)
	assert.Contains(t, err.Error(), "MaxWaiters")
	p.fire(TimerWake)
	assert.ErrorIs(t, p.reply(short).Err, ErrNotReady)
	assert.Equal(t, Starting, p.m.State())
	p.fire(TimerWake)
	for _, r := range long {
		assert.ErrorIs(t, p.reply(r).Err, ErrNotReady)
	}
	assert.Equal(t, 30*time.Second, p.now.Sub(t0.Add(time.Minute)), "the default wait is WakeTimeout")
}

// EnsureReady of a ready pool answers at once; of a stopped one starts
// it (the policy permitting); callers during an idle stop wait for the
// engine's exit, then start it.
func TestEnsureReady(t *testing.T) {
	p := idlePool(t, nil)
	req := p.request(func(r ReqID) Event { return EnsureReadyRequested{Req: r} })
	assert.Equal(t, Starting, p.m.State())
	run := p.launchStaged(staged("m.gguf", "sha256:a"), 1)
	p.noReply(req)
	p.step(Healthy{Run: run})
	require.NoError(t, p.reply(req).Err)
	req = p.request(func(r ReqID) Event { return EnsureReadyRequested{Req: r} })
	require.NoError(t, p.reply(req).Err)

	p.fire(TimerIdle)
	req = p.request(func(r ReqID) Event { return EnsureReadyRequested{Req: r} })
	assert.Empty(t, all[Stage](p.last), "the old engine is still stopping")
	p.exit(run, killedBy(15))
	assert.Equal(t, Starting, p.m.State())
	run = p.launchStaged(staged("m.gguf", "sha256:a"), 2)
	p.step(Healthy{Run: run})
	require.NoError(t, p.reply(req).Err)

	// A drain during the wait answers it.
	p.fire(TimerIdle)
	p.exit(run, killedBy(15))
	req = p.request(func(r ReqID) Event { return EnsureReadyRequested{Req: r} })
	d := p.request(func(r ReqID) Event { return DrainRequested{Req: r} })
	assert.ErrorIs(t, p.reply(req).Err, ErrNotReady)
	assert.Equal(t, Stopped, p.m.State())
	_ = d
}

// A drain of an idle pool stops it for good; a lease on it then is
// NotReady even with StartOnLease.
func TestDrainOfIdlePool(t *testing.T) {
	p := idlePool(t, nil)
	run := p.ready()
	p.fire(TimerIdle)
	d := p.request(func(r ReqID) Event { return DrainRequested{Req: r} })
	assert.Equal(t, Draining, p.m.State())
	p.noReply(d)
	p.exit(run, killedBy(15))
	assert.Equal(t, Drained, p.reply(d).Drain.Outcome)
	assert.Equal(t, Stopped, p.m.State())
	_, err := p.lease("o")
	assert.ErrorIs(t, err, ErrNotReady)
	assert.Empty(t, all[Stage](p.last))
}

// A lease waiter whose owner leaves is answered and granted nothing.
func TestLeaseWaiterOwnerGone(t *testing.T) {
	p := idlePool(t, nil)
	run := p.ready()
	p.goneIdle(run)
	a := p.request(func(r ReqID) Event { return LeaseRequested{Req: r, ID: "p/a", Owner: "o"} })
	g := p.request(func(r ReqID) Event { return OwnerGone{Req: r, Owner: "o"} })
	assert.ErrorIs(t, p.reply(a).Err, ErrNotReady)
	assert.Equal(t, 0, p.reply(g).N)
	p.step(ModelStaged{Run: p.m.start.run, Staged: staged("m.gguf", "sha256:a")})
	launch, _ := find[Launch](p.last)
	p.step(EngineStarted{Run: launch.Run, PID: 3})
	p.step(Healthy{Run: launch.Run})
	assert.Equal(t, Ready, p.m.State())
	assert.Equal(t, uint32(0), p.m.View(p.now).ActiveLeases)
}

// A pool idle before a daemon restart is idle again, not started, and its
// first lease starts it; a pinned or held pool, or one that runs, is not
// made idle.
func TestIdleRestored(t *testing.T) {
	p := idlePool(t, nil)
	since := t0.Add(-time.Hour)
	p.step(IdleRestored{Since: since})
	v := p.m.View(p.now)
	assert.Equal(t, Idle, v.State)
	assert.Equal(t, since, v.IdleSince)
	assert.Empty(t, all[Stage](p.last))
	a := p.request(func(r ReqID) Event { return LeaseRequested{Req: r, ID: "p/a", Owner: "o"} })
	assert.Equal(t, Starting, p.m.State())
	p.step(ModelStaged{Run: p.m.start.run, Staged: staged("m.gguf", "sha256:a")})
	launch, _ := find[Launch](p.last)
	p.step(EngineStarted{Run: launch.Run, PID: 3})
	p.step(Healthy{Run: launch.Run})
	assert.Equal(t, "p/a", p.reply(a).Lease)
	p.step(IdleRestored{Since: since})
	assert.Equal(t, Ready, p.m.State(), "a running pool is not made idle")

	q := newPool(t, nil)
	q.step(IdleRestored{Since: since})
	assert.Equal(t, Stopped, q.m.State(), "without IdleStopSec (or with Pin=) there is no idle")
	r := idlePool(t, nil)
	r.m = New(r.m.cfg, r.m.tr, "unreadable")
	r.step(IdleRestored{Since: since})
	assert.Equal(t, Failed, r.m.State(), "a held pool stays held")
}

// A reloaded engine's idle time starts when it is Ready.
func TestReloadedPoolIdles(t *testing.T) {
	p := idlePool(t, nil)
	old := p.ready()
	p.advance(30 * time.Second)
	req := p.request(func(r ReqID) Event { return ReloadRequested{Req: r, Ref: "n.gguf", Digest: "sha256:n"} })
	stage, ok := find[Stage](p.last)
	require.True(t, ok, "%v", p.last)
	p.step(ModelStaged{Run: stage.Run, Staged: staged("n.gguf", "sha256:n")})
	p.exit(old, killedBy(15))
	if _, launched := find[Launch](p.last); !launched {
		require.NotNil(t, p.m.start)
		p.step(ModelStaged{Run: p.m.start.run, Staged: staged("n.gguf", "sha256:n")})
	}
	launch, ok := find[Launch](p.last)
	require.True(t, ok, "%v", p.last)
	p.step(EngineStarted{Run: launch.Run, PID: 9})
	p.advance(20 * time.Second)
	p.step(Healthy{Run: launch.Run})
	require.NoError(t, p.reply(req).Err)
	require.Equal(t, Ready, p.m.State())
	assert.Equal(t, p.now.Add(time.Minute), p.timers[TimerIdle].At)
	p.goneIdle(launch.Run)
}

// Reload of an idle pool records the new model and starts nothing: the
// pool stays idle, and its next start loads the new model.
func TestReloadOfAnIdlePoolKeepsItIdle(t *testing.T) {
	p := idlePool(t, nil)
	p.goneIdle(p.ready())
	since := p.m.View(p.now).IdleSince
	p.advance(time.Second)
	r := p.request(func(id ReqID) Event {
		return ReloadRequested{Req: id, Ref: "m2", Digest: "sha256:b", Deadline: time.Minute}
	})
	rep := p.reply(r)
	require.NoError(t, rep.Err)
	assert.False(t, rep.Same)
	assert.Empty(t, all[Stage](p.last), "no engine starts")
	v := p.m.View(p.now)
	assert.Equal(t, Idle, v.State)
	assert.Equal(t, "m2", v.Model)
	assert.Equal(t, since, v.IdleSince)
	assert.Equal(t, 1, v.Starts)

	same := p.request(func(id ReqID) Event { return ReloadRequested{Req: id, Ref: "m2", Digest: "sha256:b"} })
	assert.True(t, p.reply(same).Same)

	id, owner := "p/a", "o"
	l := p.request(func(r ReqID) Event { return LeaseRequested{Req: r, ID: id, Owner: owner} })
	st, ok := find[Stage](p.last)
	require.True(t, ok, "the lease starts it: %v", p.last)
	assert.Equal(t, "m2", st.Ref, "on the reloaded model")
	run := p.launchStaged(staged("m2", "sha256:b"), 101)
	p.step(Healthy{Run: run})
	assert.Equal(t, id, p.reply(l).Lease)
	assert.Equal(t, "m2", p.m.View(p.now).Model)
}

// An idle pool whose start on demand finds its GPUs, their memory or its
// port held by another process tells its callers who holds them and is
// idle again: no retry loop starting an engine nobody waits for, no
// crash, and its next use tries again.
func TestAHeldStartOnDemandLeavesThePoolIdle(t *testing.T) {
	for _, held := range []error{
		fmt.Errorf("%s: %w", noMemory, ErrNoGPUMemory),
		fmt.Errorf("GPU GPU-0 in use by pid 4242 (python3): %w", ErrGPUBusy),
		fmt.Errorf("port 8000 held by pid 4242: %w", ErrPortBusy),
	} {
		p := idlePool(t, nil)
		p.goneIdle(p.ready())
		l := p.request(func(r ReqID) Event { return LeaseRequested{Req: r, ID: "p/a", Owner: "o"} })
		stage, _ := find[Stage](p.last)
		p.step(ModelStaged{Run: stage.Run, Staged: staged("m.gguf", "sha256:a")})
		launch, _ := find[Launch](p.last)
		p.step(StartFailed{Run: launch.Run, Err: held})
		err := p.reply(l).Err
		require.Error(t, err)
		assert.Contains(t, err.Error(), "4242")
		v := p.m.View(p.now)
		assert.Equal(t, Idle, v.State, "%v", held)
		assert.Equal(t, p.now, v.IdleSince)
		assert.Zero(t, v.Policy.CrashCount)
		assert.NotContains(t, p.timers, TimerRetry, "no engine starts for nobody")
		assert.NotContains(t, p.timers, TimerRestart)

		// Its next use starts it again.
		e := p.request(func(r ReqID) Event { return EnsureReadyRequested{Req: r} })
		assert.Equal(t, Starting, p.m.State())
		run := p.launchStaged(staged("m.gguf", "sha256:a"), 102)
		p.step(Healthy{Run: run})
		require.NoError(t, p.reply(e).Err)
	}

	// An engine of an idle pool's start that exits as another process
	// holds its port: idle again too.
	p := idlePool(t, nil)
	p.goneIdle(p.ready())
	e := p.request(func(r ReqID) Event { return EnsureReadyRequested{Req: r} })
	run := p.launchStaged(staged("m.gguf", "sha256:a"), 103)
	x := exitStatus(1)
	x.PortHeld = "port 8000 held by pid 4242 (nc)"
	p.exit(run, x)
	assert.ErrorIs(t, p.reply(e).Err, ErrNotReady)
	assert.Equal(t, Idle, p.m.State())
	assert.NotContains(t, p.timers, TimerRetry)

	// A stopped pool's EnsureReady held so is not made idle.
	q := newPool(t, func(c *Config) { c.IdleStop = time.Minute })
	e = q.request(func(r ReqID) Event { return EnsureReadyRequested{Req: r} })
	stage, _ := find[Stage](q.last)
	q.step(ModelStaged{Run: stage.Run, Staged: staged("m.gguf", "sha256:a")})
	launch, _ := find[Launch](q.last)
	q.step(StartFailed{Run: launch.Run, Err: fmt.Errorf("held: %w", ErrGPUBusy)})
	require.Error(t, q.reply(e).Err)
	assert.Equal(t, Failed, q.m.State())
}
