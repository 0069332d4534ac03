package lifecycle

import (
	"errors"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func sleepPool(t *testing.T, mod func(*Config)) *pool {
	return idlePool(t, func(c *Config) {
		c.Sleep, c.SleepLevel = true, 2
		if mod != nil {
			mod(c)
		}
	})
}

// asleep fires the idle timer of a ready pool and has its engine sleep.
func (p *pool) asleep(run RunID) {
	p.t.Helper()
	acts := p.fire(TimerIdle)
	sl, ok := find[Sleep](acts)
	require.True(p.t, ok, "the unused engine is asked to sleep: %v", acts)
	require.Equal(p.t, Sleep{Run: run, Level: 2}, sl)
	_, stopped := find[StopScope](acts)
	require.False(p.t, stopped, "a sleeping engine is not stopped")
	require.Equal(p.t, Sleeping, p.m.State())
	p.step(Slept{Run: run})
	require.Equal(p.t, Sleeping, p.m.State())
}

// An unused pool with Sleep= puts its engine to sleep: Sleeping, not
// ready, the same process, no crash, no stop, IdleSince set.
func TestUnusedPoolSleeps(t *testing.T) {
	p := sleepPool(t, nil)
	run := p.ready()
	at := p.timers[TimerIdle].At
	p.asleep(run)
	v := p.m.View(p.now)
	assert.Equal(t, Sleeping, v.State)
	assert.False(t, v.Ready)
	assert.True(t, v.Live)
	assert.Equal(t, 100, v.MainPID)
	assert.Equal(t, at, v.IdleSince)
	assert.Zero(t, v.Policy.CrashCount)
	assert.Equal(t, 1, v.Starts)
	assert.NotContains(t, p.timers, TimerIdle)
}

// A lease and EnsureReady on a sleeping pool share one wake, the same
// engine serves them (no Stage, no Launch), and the wake is counted with
// its duration.
func TestLeaseAndEnsureReadyShareOneWake(t *testing.T) {
	p := sleepPool(t, nil)
	run := p.ready()
	p.asleep(run)
	a := p.request(func(r ReqID) Event { return LeaseRequested{Req: r, ID: "p/a", Owner: "o"} })
	wake, ok := find[Wake](p.last)
	require.True(t, ok, "the lease wakes the engine: %v", p.last)
	assert.Equal(t, run, wake.Run)
	assert.Equal(t, Waking, p.m.State())
	b := p.request(func(r ReqID) Event { return EnsureReadyRequested{Req: r} })
	c := p.request(func(r ReqID) Event { return LeaseRequested{Req: r, ID: "p/c", Owner: "o2"} })
	assert.Empty(t, all[Wake](p.last), "one wake for all")
	for _, r := range []ReqID{a, b, c} {
		p.noReply(r)
	}
	p.advance(3 * time.Second)
	p.step(Woke{Run: run})
	assert.Empty(t, all[Stage](p.last))
	assert.Empty(t, all[Launch](p.last))
	assert.Equal(t, "p/a", p.reply(a).Lease)
	assert.NoError(t, p.reply(b).Err)
	assert.Equal(t, "p/c", p.reply(c).Lease)
	cw, ok := find[CountWake](p.last)
	require.True(t, ok)
	assert.Equal(t, CountWake{Result: "ok", Took: 3 * time.Second}, cw)
	v := p.m.View(p.now)
	assert.Equal(t, Ready, v.State)
	assert.True(t, v.Ready)
	assert.Equal(t, 100, v.MainPID)
	assert.Equal(t, 1, v.Starts, "a wake is no start")
	assert.True(t, v.IdleSince.IsZero())
}

// A lease asked while the Sleep is still out waits for its answer, then
// wakes the engine; Start of a sleeping pool wakes it too.
func TestLeaseDuringSleepWakesOnceAsleep(t *testing.T) {
	p := sleepPool(t, nil)
	run := p.ready()
	p.fire(TimerIdle)
	a := p.request(func(r ReqID) Event { return LeaseRequested{Req: r, ID: "p/a", Owner: "o"} })
	assert.Empty(t, all[Wake](p.last), "not before the engine answered its Sleep")
	p.step(Slept{Run: run})
	_, ok := find[Wake](p.last)
	require.True(t, ok)
	p.step(Woke{Run: run})
	assert.Equal(t, "p/a", p.reply(a).Lease)

	q := sleepPool(t, func(c *Config) { c.StartOnLease = false })
	run = q.ready()
	q.asleep(run)
	_, err := q.lease("o")
	assert.ErrorIs(t, err, ErrNotReady)
	assert.Contains(t, err.Error(), "is sleeping")
	assert.Empty(t, all[Wake](q.last))
	s := q.request(func(r ReqID) Event { return StartRequested{Req: r} })
	assert.NoError(t, q.reply(s).Err)
	_, ok = find[Wake](q.last)
	assert.True(t, ok, "Start wakes it")
	assert.Equal(t, Waking, q.m.State())
}

// A sleep the engine refuses is an idle stop: the pool is Idle, its
// engine stopped, no crash; a lease then starts a fresh engine.
func TestFailedSleepStopsTheEngine(t *testing.T) {
	p := sleepPool(t, nil)
	run := p.ready()
	p.fire(TimerIdle)
	p.step(Slept{Run: run, Err: errors.New("POST /sleep answered 500")})
	stop, ok := find[StopScope](p.last)
	require.True(t, ok)
	assert.Equal(t, run, stop.Run)
	_, counted := find[CountIdleStop](p.last)
	assert.True(t, counted)
	assert.Equal(t, Idle, p.m.State())
	assert.Contains(t, p.m.View(p.now).LastError, "sleep failed")
	p.exit(run, killedBy(syscall.SIGTERM))
	v := p.m.View(p.now)
	assert.Equal(t, Idle, v.State)
	assert.Zero(t, v.Policy.CrashCount)
	p.request(func(r ReqID) Event { return LeaseRequested{Req: r, ID: "p/a", Owner: "o"} })
	_, ok = find[Stage](p.last)
	assert.True(t, ok, "the lease starts a fresh engine")
}

// A wake the engine refuses is a health failure, not a crash: the engine
// is stopped and a fresh one started for the callers, who are answered
// once it is Ready.
func TestFailedWakeRestartsTheEngine(t *testing.T) {
	p := sleepPool(t, nil)
	run := p.ready()
	p.asleep(run)
	a := p.request(func(r ReqID) Event { return LeaseRequested{Req: r, ID: "p/a", Owner: "o"} })
	p.step(Woke{Run: run, Err: errors.New("POST /wake_up answered 500")})
	_, ok := find[StopScope](p.last)
	require.True(t, ok, "the engine that did not wake is stopped")
	cw, _ := find[CountWake](p.last)
	assert.Equal(t, "failed", cw.Result)
	_, hf := find[CountHealthFailure](p.last)
	assert.True(t, hf)
	p.noReply(a)
	p.exit(run, killedBy(syscall.SIGTERM))
	v := p.m.View(p.now)
	assert.Zero(t, v.Policy.CrashCount, "a failed wake is no crash")
	assert.Equal(t, Starting, v.State)
	assert.Contains(t, v.LastError, "wake failed")
	fresh := p.launchStaged(staged("m.gguf", "sha256:a"), 200)
	assert.NotEqual(t, run, fresh)
	p.noReply(a)
	p.step(Healthy{Run: fresh})
	assert.Equal(t, "p/a", p.reply(a).Lease)
	assert.Equal(t, 200, p.m.View(p.now).MainPID)

	// An engine that dies on its own while waking crashed.
	q := sleepPool(t, nil)
	run = q.ready()
	q.asleep(run)
	b := q.request(func(r ReqID) Event { return EnsureReadyRequested{Req: r} })
	q.exit(run, Exit{Status: syscall.WaitStatus(syscall.SIGSEGV)})
	v = q.m.View(q.now)
	assert.EqualValues(t, 1, v.Policy.CrashCount)
	assert.Equal(t, Backoff, v.State)
	assert.ErrorIs(t, q.reply(b).Err, ErrNotReady)
}

// Every wake is followed by the warm-up where the pool sets one; a
// failed warm-up after a wake is a failed wake.
func TestWakeIsWarmedUp(t *testing.T) {
	p := sleepPool(t, func(c *Config) { c.Warmup = true })
	req := p.request(func(id ReqID) Event { return StartRequested{Req: id} })
	run := p.launchStaged(staged("m.gguf", "sha256:a"), 100)
	require.NoError(t, p.reply(req).Err)
	p.step(Healthy{Run: run})
	p.step(WarmedUp{Run: run})
	require.Equal(t, Ready, p.m.State())
	p.asleep(run)
	e := p.request(func(r ReqID) Event { return EnsureReadyRequested{Req: r} })
	p.step(Woke{Run: run})
	w, ok := find[Warmup](p.last)
	require.True(t, ok, "the woken engine is warmed up: %v", p.last)
	assert.Equal(t, run, w.Run)
	assert.Equal(t, Warming, p.m.State())
	p.noReply(e)
	p.step(WarmedUp{Run: run})
	assert.NoError(t, p.reply(e).Err)
	assert.Equal(t, Ready, p.m.State())

	p.asleep(run)
	e = p.request(func(r ReqID) Event { return EnsureReadyRequested{Req: r} })
	p.step(Woke{Run: run})
	p.step(WarmedUp{Run: run, Err: errors.New("answered 503")})
	_, ok = find[StopScope](p.last)
	require.True(t, ok)
	p.exit(run, killedBy(syscall.SIGTERM))
	assert.Zero(t, p.m.View(p.now).Policy.CrashCount)
	assert.Equal(t, Starting, p.m.State(), "a fresh engine starts")
}

// Asleep an engine refuses to generate: failed canaries and a frozen
// token count do not count; health probes do, and a crash is a crash.
func TestNoCanaryOrStallWhileAsleep(t *testing.T) {
	p := sleepPool(t, func(c *Config) { c.Stall = 10 * time.Second })
	run := p.ready()
	p.asleep(run)
	refused := errors.New("engine is sleeping")
	for range 5 {
		p.advance(30 * time.Second)
		p.step(Probed{Run: run, Err: refused, Canary: true})
		p.step(Progress{Run: run, InFlight: 1, Tokens: 7})
		_, stopped := find[StopScope](p.last)
		require.False(t, stopped)
	}
	assert.Empty(t, p.m.View(p.now).HealthFailures)
	assert.Equal(t, Sleeping, p.m.State())
	// Health probes still count.
	for range 3 {
		p.step(Probed{Run: run, Err: errors.New("refused")})
	}
	_, stopped := find[StopScope](p.last)
	assert.True(t, stopped, "FailureThreshold failed probes stop a sleeping engine")
	p.exit(run, killedBy(syscall.SIGTERM))
	assert.Equal(t, Backoff, p.m.State())
	assert.EqualValues(t, 1, p.m.View(p.now).Policy.CrashCount)
}

// A drain of a sleeping pool stops its engine.
func TestDrainOfASleepingPool(t *testing.T) {
	p := sleepPool(t, nil)
	run := p.ready()
	p.asleep(run)
	d := p.request(func(id ReqID) Event { return DrainRequested{Req: id} })
	_, ok := find[StopScope](p.last)
	require.True(t, ok)
	assert.Equal(t, Draining, p.m.State())
	p.exit(run, killedBy(syscall.SIGTERM))
	assert.NoError(t, p.reply(d).Err)
	assert.Equal(t, Stopped, p.m.State())
	// A late Woke or Slept of the gone run changes nothing.
	p.step(Woke{Run: run})
	p.step(Slept{Run: run})
	assert.Equal(t, Stopped, p.m.State())
}

// Reload of a sleeping pool stops the sleeping engine (nothing to drain)
// and starts the new model: the pool ends Ready on it, and the reload is
// answered then.
func TestReloadOfASleepingPoolStartsTheNewModel(t *testing.T) {
	p := sleepPool(t, nil)
	run := p.ready()
	p.asleep(run)
	r := p.request(func(id ReqID) Event { return ReloadRequested{Req: id, Ref: "m2", Digest: "sha256:b"} })
	p.noReply(r)
	st, ok := find[Stage](p.last)
	require.True(t, ok, "the new model is staged: %v", p.last)
	assert.Equal(t, "m2", st.Ref)
	p.step(ModelStaged{Run: st.Run, Staged: staged("m2", "sha256:b")})
	stop, ok := find[StopScope](p.last)
	require.True(t, ok, "the sleeping engine is stopped: %v", p.last)
	assert.Equal(t, run, stop.Run)
	p.exit(run, killedBy(syscall.SIGTERM))
	cand := p.launchStaged(staged("m2", "sha256:b"), 200)
	p.step(Healthy{Run: cand})
	require.NoError(t, p.reply(r).Err)
	v := p.m.View(p.now)
	assert.Equal(t, Ready, v.State)
	assert.Equal(t, "m2", v.Model)
	assert.Equal(t, 200, v.MainPID)
	assert.Zero(t, v.Policy.CrashCount)

	// A reload that cannot stage its model leaves the engine asleep.
	q := sleepPool(t, nil)
	run = q.ready()
	q.asleep(run)
	r = q.request(func(id ReqID) Event { return ReloadRequested{Req: id, Ref: "m3", Digest: "sha256:c"} })
	st, _ = find[Stage](q.last)
	q.step(ModelStaged{Run: st.Run, Err: errors.New("no such file")})
	assert.ErrorIs(t, q.reply(r).Err, ErrReloadFailed)
	assert.Empty(t, all[StopScope](q.last))
	assert.Equal(t, Sleeping, q.m.State())
	e := q.request(func(id ReqID) Event { return EnsureReadyRequested{Req: id} })
	_, ok = find[Wake](q.last)
	require.True(t, ok, "its next use wakes it: %v", q.last)
	q.step(Woke{Run: run})
	require.NoError(t, q.reply(e).Err)
}

// An engine a previous daemon left may be asleep: with Sleep= it is woken
// (a no-op for an awake vLLM) before it serves, the wake not counted.
func TestAdoptedEngineIsWokenBeforeItServes(t *testing.T) {
	p := sleepPool(t, nil)
	run := p.m.NewRun()
	req := p.request(func(r ReqID) Event {
		return Adopted{Req: r, Run: run, PID: 77, Started: p.now.Add(-time.Hour), Staged: staged("m.gguf", "sha256:a"), Invocation: "inv"}
	})
	require.NoError(t, p.reply(req).Err)
	p.step(Healthy{Run: run})
	w, ok := find[Wake](p.last)
	require.True(t, ok, "the adopted engine is woken: %v", p.last)
	assert.Equal(t, run, w.Run)
	assert.Equal(t, Starting, p.m.State(), "not ready before it is awake")
	p.step(Woke{Run: run})
	assert.Equal(t, Ready, p.m.State())
	assert.Empty(t, all[CountWake](p.last))
	assert.Equal(t, 77, p.m.View(p.now).MainPID)

	// Without Sleep= nothing is asked.
	q := idlePool(t, nil)
	run = q.m.NewRun()
	q.request(func(r ReqID) Event {
		return Adopted{Req: r, Run: run, PID: 78, Started: q.now.Add(-time.Hour), Staged: staged("m.gguf", "sha256:a")}
	})
	q.step(Healthy{Run: run})
	assert.Empty(t, all[Wake](q.last))
	assert.Equal(t, Ready, q.m.State())
}

// index is the position of the first action of type T in acts (-1: none).
func index[T Action](acts []Action) int {
	for i, a := range acts {
		if _, ok := a.(T); ok {
			return i
		}
	}
	return -1
}

// An engine whose record says it was left asleep is adopted sleeping: the
// same process, not woken at its first good probe, parked if it was (a
// park answers at once); it is woken on demand as any sleeping engine,
// once it has answered a probe, its record saying awake before the Wake
// goes out. Without that record, or starting, it is woken as before.
func TestAdoptedAsleepEngineSleepsOn(t *testing.T) {
	p := sleepPool(t, nil)
	since := p.now.Add(-10 * time.Minute)
	run := p.m.NewRun()
	req := p.request(func(r ReqID) Event {
		return Adopted{Req: r, Run: run, PID: 77, Started: p.now.Add(-time.Hour), Staged: staged("m.gguf", "sha256:a"),
			Invocation: "inv", Asleep: true, AsleepSince: since, Parked: true}
	})
	require.NoError(t, p.reply(req).Err)
	_, watched := find[Watch](p.last)
	assert.True(t, watched, "its probes go on: %v", p.last)
	assert.Empty(t, all[WriteRecord](p.last), "its record says so already")
	v := p.m.View(p.now)
	assert.Equal(t, Sleeping, v.State)
	assert.False(t, v.Ready)
	assert.True(t, v.Live)
	assert.Equal(t, 77, v.MainPID)
	assert.Equal(t, since, v.IdleSince)

	// Wanted before its first probe: woken once it answers.
	e := p.request(func(r ReqID) Event { return EnsureReadyRequested{Req: r} })
	assert.Empty(t, all[Wake](p.last))
	p.noReply(e)
	p.step(Healthy{Run: run})
	assert.NotEqual(t, -1, index[Wake](p.last), "wanted, it is woken: %v", p.last)
	assert.Equal(t, Waking, p.m.State())
	p.step(Woke{Run: run})
	require.NoError(t, p.reply(e).Err)
	assert.Equal(t, Ready, p.m.State())

	// Not wanted: it sleeps on; a park finds it parked.
	p = sleepPool(t, nil)
	run = p.m.NewRun()
	p.request(func(r ReqID) Event {
		return Adopted{Req: r, Run: run, PID: 78, Started: p.now.Add(-time.Hour), Staged: staged("m.gguf", "sha256:a"),
			Asleep: true, AsleepSince: since, Parked: true}
	})
	p.step(Healthy{Run: run})
	assert.Empty(t, all[Wake](p.last), "not woken by its first good probe: %v", p.last)
	assert.Equal(t, Sleeping, p.m.State())
	p.step(Probed{Run: run})
	p.step(Probed{Run: run, Canary: true, Err: errors.New("asleep")})
	assert.Equal(t, Sleeping, p.m.State())
	assert.Empty(t, p.m.View(p.now).HealthFailures)
	park := p.request(func(r ReqID) Event { return ParkRequested{Req: r, Deadline: time.Minute} })
	require.NoError(t, p.reply(park).Err)
	assert.Empty(t, all[Sleep](p.last))
	assert.Empty(t, all[StopScope](p.last))
	assert.Equal(t, Sleeping, p.m.State())
	l := p.request(func(r ReqID) Event { return LeaseRequested{Req: r, ID: "p/a", Owner: "o"} })
	rec, wake := index[WriteRecord](p.last), index[Wake](p.last)
	require.NotEqual(t, -1, wake, "a lease wakes it: %v", p.last)
	require.NotEqual(t, -1, rec, "its record says awake: %v", p.last)
	assert.Less(t, rec, wake, "recorded awake before the Wake goes out")
	assert.Equal(t, WriteRecord{Run: run, Model: "m.gguf"}, p.last[rec])
	p.advance(2 * time.Second)
	p.step(Woke{Run: run})
	assert.Equal(t, "p/a", p.reply(l).Lease)
	assert.Equal(t, 78, p.m.View(p.now).MainPID)
	cw, ok := find[CountWake](p.last)
	require.True(t, ok, "a wake on demand, counted")
	assert.Equal(t, CountWake{Result: "ok", Took: 2 * time.Second}, cw)

	// Crashed asleep and parked: not restarted beside the awake member.
	p = sleepPool(t, nil)
	run = p.m.NewRun()
	p.request(func(r ReqID) Event {
		return Adopted{Req: r, Run: run, PID: 79, Started: p.now.Add(-time.Hour), Staged: staged("m.gguf", "sha256:a"),
			Asleep: true, Parked: true}
	})
	assert.Equal(t, p.now, p.m.View(p.now).IdleSince, "asleep since no known time: since now")
	p.exit(run, killedBy(syscall.SIGSEGV))
	assert.Equal(t, Idle, p.m.State())

	// No record of sleep, a starting engine, or leases: woken as before.
	for name, e := range map[string]Adopted{
		"no record": {},
		"starting":  {Asleep: true, Starting: true},
		"leases":    {Asleep: true, Leases: map[string]string{"p/x": "o"}, RecordHeld: 1},
	} {
		q := sleepPool(t, nil)
		run := q.m.NewRun()
		q.request(func(r ReqID) Event {
			e.Req, e.Run, e.PID, e.Started, e.Staged = r, run, 80, q.now.Add(-time.Hour), staged("m.gguf", "sha256:a")
			return e
		})
		assert.Equal(t, Starting, q.m.State(), name)
		q.step(Healthy{Run: run})
		_, woken := find[Wake](q.last)
		assert.True(t, woken, "%s: woken before it serves: %v", name, q.last)
	}
	// Without Sleep= a record of sleep is not acted on.
	q := idlePool(t, nil)
	run = q.m.NewRun()
	q.request(func(r ReqID) Event {
		return Adopted{Req: r, Run: run, PID: 81, Started: q.now.Add(-time.Hour), Staged: staged("m.gguf", "sha256:a"), Asleep: true}
	})
	q.step(Healthy{Run: run})
	assert.Equal(t, Ready, q.m.State())
}

// The runtime record says whether the engine was left asleep: set once a
// Sleep is answered (idle, or parked for its group), cleared before a
// wake goes out; the record goes with the engine.
func TestSleepIsRecorded(t *testing.T) {
	p := sleepPool(t, nil)
	run := p.ready()
	acts := p.fire(TimerIdle)
	at := p.now
	assert.Empty(t, all[WriteRecord](acts), "asked to sleep is not asleep")
	p.step(Slept{Run: run})
	assert.Equal(t, []WriteRecord{{Run: run, Model: "m.gguf", Asleep: true, AsleepSince: at}}, all[WriteRecord](p.last))
	w, ok := p.m.RecordWritable()
	require.True(t, ok)
	assert.True(t, w.Asleep, "a record written for another reason says so too")

	// A park of the sleeping pool: parked from now.
	park := p.request(func(r ReqID) Event { return ParkRequested{Req: r} })
	require.NoError(t, p.reply(park).Err)
	assert.Equal(t, []WriteRecord{{Run: run, Model: "m.gguf", Asleep: true, AsleepSince: at, Parked: true}}, all[WriteRecord](p.last))

	e := p.request(func(r ReqID) Event { return EnsureReadyRequested{Req: r} })
	rec, wake := index[WriteRecord](p.last), index[Wake](p.last)
	require.NotEqual(t, -1, wake)
	require.NotEqual(t, -1, rec, "%v", p.last)
	assert.Less(t, rec, wake)
	assert.Equal(t, WriteRecord{Run: run, Model: "m.gguf"}, p.last[rec])
	p.step(Woke{Run: run})
	require.NoError(t, p.reply(e).Err)
	assert.Empty(t, all[WriteRecord](p.last), "nothing more to say")

	// Parked asleep by a park of the awake pool.
	p.request(func(r ReqID) Event { return ParkRequested{Req: r} })
	_, asked := find[Sleep](p.last)
	require.True(t, asked, "%v", p.last)
	assert.Empty(t, all[WriteRecord](p.last))
	p.step(Slept{Run: run})
	assert.Equal(t, []WriteRecord{{Run: run, Model: "m.gguf", Asleep: true, AsleepSince: p.now, Parked: true}}, all[WriteRecord](p.last))
	assert.Equal(t, Sleeping, p.m.State())

	// Its exit removes the record: a fresh engine is recorded awake.
	p.exit(run, exitStatus(0))
	_, removed := find[RemoveRecord](p.last)
	assert.True(t, removed)
	assert.Empty(t, all[WriteRecord](p.last))
}
