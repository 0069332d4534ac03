package lifecycle

import (
	"errors"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestDrainOfAStoppedPoolIsDrainedAtOnce(t *testing.T) {
	p := newPool(t, nil)
	req := p.request(func(id ReqID) Event { return DrainRequested{Req: id, Deadline: time.Minute} })
	rep := p.reply(req)
	require.NoError(t, rep.Err)
	assert.Equal(t, Drained, rep.Drain.Outcome)
	assert.Equal(t, Stopped, p.m.State())
	_, stopped := find[StopScope](p.last)
	assert.False(t, stopped, "nothing to stop")
}

// The drain table: how leases and the deadline decide the outcome.
func TestDrainOutcomes(t *testing.T) {
	for _, tc := range []struct {
		name   string
		leases int
		// release: the leases are given back before the deadline.
		release bool
		outcome string
		revoked int
	}{
		{name: "no leases: the engine stops at once", outcome: Drained},
		{name: "leases released before the deadline", leases: 2, release: true, outcome: Drained},
		{name: "leases held past the deadline are revoked", leases: 3, outcome: Forced, revoked: 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newPool(t, nil)
			run := p.ready()
			var ids []string
			for i := range tc.leases {
				id, err := p.lease(string(rune('a' + i)))
				require.NoError(t, err)
				ids = append(ids, id)
			}
			req := p.request(func(id ReqID) Event { return DrainRequested{Req: id, Deadline: 30 * time.Second} })
			_, stopping := find[StopScope](p.last)
			assert.Equal(t, Draining, p.m.State())
			v := p.m.View(p.now)
			assert.True(t, v.Draining)
			assert.False(t, v.Ready, "a draining pool takes no lease")
			_, err := p.lease("late")
			assert.ErrorIs(t, err, ErrDraining)

			assert.Equal(t, tc.leases == 0, stopping, "the engine stops once no lease holds it")
			if tc.leases > 0 {
				require.Contains(t, p.timers, TimerDrainDeadline)
				if tc.release {
					for i, id := range ids {
						p.advance(time.Second)
						p.request(func(r ReqID) Event { return LeaseReleased{Req: r, ID: id} })
						_, stopping = find[StopScope](p.last)
						assert.Equal(t, i == len(ids)-1, stopping, "stopped the instant the last lease goes, not before")
					}
					assert.NotContains(t, p.timers, TimerDrainDeadline, "the deadline is disarmed")
				} else {
					acts := p.fire(TimerDrainDeadline)
					_, counted := find[CountForcedDrain](acts)
					assert.True(t, counted)
					_, stopping = find[StopScope](acts)
					assert.True(t, stopping)
				}
			}
			p.noReply(req)
			p.advance(time.Second)
			p.exit(run, killedBy(15))
			rep := p.reply(req)
			require.NoError(t, rep.Err)
			assert.Equal(t, tc.outcome, rep.Drain.Outcome)
			assert.Equal(t, tc.revoked, rep.Drain.Revoked)
			assert.Equal(t, tc.revoked > 0, rep.Drain.LeasesDrainedAt.IsZero())
			assert.Equal(t, Stopped, p.m.State())
			v = p.m.View(p.now)
			assert.False(t, v.Live || v.Ready || v.Draining)
			assert.Zero(t, v.ActiveLeases)
			assert.Zero(t, v.Policy.CrashCount, "a drain's stop is no crash")
			_, restart := p.timers[TimerRestart]
			assert.False(t, restart, "a drained pool is not restarted")
		})
	}
}

func TestConcurrentDrainsShareOneOutcomeAndAShorterDeadlineTightens(t *testing.T) {
	p := newPool(t, nil)
	run := p.ready()
	_, err := p.lease("router")
	require.NoError(t, err)
	first := p.request(func(id ReqID) Event { return DrainRequested{Req: id, Deadline: time.Minute} })
	long := p.timers[TimerDrainDeadline].At
	second := p.request(func(id ReqID) Event { return DrainRequested{Req: id, Deadline: 0} })
	assert.True(t, p.timers[TimerDrainDeadline].At.Before(long), "Stop during a drain tightens its deadline")
	p.fire(TimerDrainDeadline)
	p.exit(run, killedBy(15))
	a, b := p.reply(first), p.reply(second)
	assert.Equal(t, Forced, a.Drain.Outcome)
	assert.Equal(t, a.Drain, b.Drain)
}

func TestDrainCancelsAScheduledRestart(t *testing.T) {
	p := newPool(t, nil)
	run := p.ready()
	p.exit(run, exitStatus(3))
	require.Equal(t, Backoff, p.m.State())
	restart := p.timers[TimerRestart]
	req := p.request(func(id ReqID) Event { return DrainRequested{Req: id} })
	assert.Equal(t, Drained, p.reply(req).Drain.Outcome)
	assert.NotContains(t, p.timers, TimerRestart)
	// The old timer fires anyway (it was already on its way): stale.
	p.now = restart.At
	acts := p.step(TimerFired{Timer: TimerRestart, Gen: restart.Gen})
	_, staged := find[Stage](acts)
	assert.False(t, staged, "a drained pool does not restart")
	assert.Equal(t, Stopped, p.m.State())
	assert.Zero(t, p.m.View(p.now).NextRestart)
}

func TestCrashDuringADrainIsCountedNotRestarted(t *testing.T) {
	p := newPool(t, nil)
	run := p.ready()
	_, err := p.lease("router")
	require.NoError(t, err)
	req := p.request(func(id ReqID) Event { return DrainRequested{Req: id, Deadline: time.Minute} })
	p.exit(run, exitStatus(1))
	rep := p.reply(req)
	assert.Equal(t, Forced, rep.Drain.Outcome, "its lease went with the engine")
	assert.Equal(t, 1, rep.Drain.Revoked)
	v := p.m.View(p.now)
	assert.Equal(t, uint64(1), v.Policy.CrashCount)
	assert.Equal(t, Stopped, v.State)
	assert.NotContains(t, p.timers, TimerRestart)
}

// With no slot cap (Slots=0, the default) one bus connection still holds
// at most MaxLeasesPerOwner leases on a pool: each costs memory and a
// rewrite of the runtime record.
func TestAConnectionHoldsAtMost64LeasesOnAPoolWithoutSlots(t *testing.T) {
	p := newPool(t, nil)
	run := p.ready()
	var first string
	for i := range MaxLeasesPerOwner {
		id, err := p.lease(":1.7")
		require.NoError(t, err, "lease %d", i)
		if first == "" {
			first = id
		}
	}
	_, err := p.lease(":1.7")
	require.ErrorIs(t, err, ErrNoCapacity)
	assert.Contains(t, err.Error(), "64 leases")
	assert.Equal(t, uint32(MaxLeasesPerOwner), p.m.View(p.now).ActiveLeases, "the refusal changes nothing")
	_, err = p.lease(":1.8")
	require.NoError(t, err, "another connection has its own cap")

	req := p.request(func(r ReqID) Event { return LeaseReleased{Req: r, ID: first, Owner: ":1.7", CheckOwner: true} })
	require.NoError(t, p.reply(req).Err)
	_, err = p.lease(":1.7")
	require.NoError(t, err, "a released lease frees its place")

	req = p.request(func(r ReqID) Event { return OwnerGone{Req: r, Owner: ":1.7"} })
	require.Equal(t, MaxLeasesPerOwner, p.reply(req).N)
	_, err = p.lease(":1.7")
	require.NoError(t, err, "a connection's departure frees its places")

	p.exit(run, exitStatus(2))
	p.ready()
	for i := range MaxLeasesPerOwner {
		_, err := p.lease(":1.7")
		require.NoError(t, err, "revoked leases free their places (lease %d)", i)
	}
}

func TestLeaseRules(t *testing.T) {
	p := newPool(t, func(c *Config) { c.Slots = 2 })
	_, err := p.lease("early")
	assert.ErrorIs(t, err, ErrNotReady, "no lease on a stopped pool")
	run := p.ready()
	a, err := p.lease("r1")
	require.NoError(t, err)
	_, err = p.lease("r1")
	require.NoError(t, err)
	_, err = p.lease("r2")
	assert.ErrorIs(t, err, ErrNoCapacity)

	rel := func(id, owner string, check bool) error {
		req := p.request(func(r ReqID) Event { return LeaseReleased{Req: r, ID: id, Owner: owner, CheckOwner: check} })
		return p.reply(req).Err
	}
	assert.ErrorIs(t, rel("p/none", "", false), ErrNoSuchLease)
	assert.ErrorIs(t, rel(a, "r2", true), ErrNotOwner)
	assert.Equal(t, uint32(2), p.m.View(p.now).ActiveLeases, "refusals change nothing")
	require.NoError(t, rel(a, "r1", true))
	assert.ErrorIs(t, rel(a, "r1", true), ErrNoSuchLease, "released once")

	req := p.request(func(r ReqID) Event { return OwnerGone{Req: r, Owner: "r1"} })
	assert.Equal(t, 1, p.reply(req).N)
	assert.Zero(t, p.m.View(p.now).ActiveLeases)

	_, err = p.lease("r3")
	require.NoError(t, err)
	p.exit(run, exitStatus(2))
	assert.Zero(t, p.m.View(p.now).ActiveLeases, "a crash revokes the leases")
	_, err = p.lease("r3")
	assert.True(t, errors.Is(err, ErrNotReady))
}

// Long operations say where they are: a drain counts the leases released
// of those held when it began; staging, the bytes hashed.
func TestOperationAndProgress(t *testing.T) {
	p := newPool(t, nil)
	req := p.request(func(id ReqID) Event { return StartRequested{Req: id} })
	v := p.m.View(p.now)
	assert.Equal(t, "staging", v.Operation)
	assert.Equal(t, -1.0, v.Progress, "not known before the first report")
	stage, _ := find[Stage](p.last)
	p.step(StageProgress{Run: stage.Run, Fraction: 0.25})
	assert.Equal(t, 0.25, p.m.View(p.now).Progress)
	p.step(StageProgress{Run: stage.Run + 99, Fraction: 0.9})
	assert.Equal(t, 0.25, p.m.View(p.now).Progress, "another start's word changes nothing")
	p.step(ModelStaged{Run: stage.Run, Staged: staged("m.gguf", "sha256:a")})
	launch, _ := find[Launch](p.last)
	p.step(EngineStarted{Run: launch.Run, PID: 100})
	run := launch.Run
	require.NoError(t, p.reply(req).Err)
	assert.Equal(t, "starting", p.m.View(p.now).Operation)
	assert.Equal(t, -1.0, p.m.View(p.now).Progress)
	p.step(Healthy{Run: run})
	v = p.m.View(p.now)
	assert.Equal(t, "", v.Operation)
	assert.Equal(t, 0.0, v.Progress)

	var ids []string
	for i := range 4 {
		id, err := p.lease(string(rune('a' + i)))
		require.NoError(t, err)
		ids = append(ids, id)
	}
	p.request(func(id ReqID) Event { return DrainRequested{Req: id, Deadline: time.Minute} })
	assert.Equal(t, "draining", p.m.View(p.now).Operation)
	for i, id := range ids {
		assert.Equal(t, float64(i)/4, p.m.View(p.now).Progress)
		p.request(func(r ReqID) Event { return LeaseReleased{Req: r, ID: id} })
	}
	assert.Equal(t, 1.0, p.m.View(p.now).Progress, "every lease released: the engine stops")
}

// An adopted engine still starting, drained before it is healthy: its
// first healthy word does not make the pool Ready (nor warm it up) while
// the drain goes on.
func TestAnEngineHealthyDuringItsDrainServesNobody(t *testing.T) {
	p := newPool(t, func(c *Config) { c.Warmup = true })
	run := p.m.NewRun()
	req := p.request(func(id ReqID) Event {
		return Adopted{Req: id, Run: run, PID: 100, Started: p.now, Staged: staged("m.gguf", "sha256:a"),
			Leases: map[string]string{"l1": "o1"}, RecordHeld: 1, Starting: true, Invocation: "inv-now"}
	})
	require.NoError(t, p.reply(req).Err)
	require.Equal(t, Starting, p.m.State())
	drain := p.request(func(id ReqID) Event { return DrainRequested{Req: id, Deadline: time.Minute} })
	require.Equal(t, Draining, p.m.State())

	p.step(Healthy{Run: run})
	assert.Equal(t, Draining, p.m.State())
	_, warm := find[Warmup](p.last)
	assert.False(t, warm, "no warm-up")
	_, rec := find[WriteRecord](p.last)
	assert.False(t, rec, "no runtime record")

	p.request(func(id ReqID) Event { return LeaseReleased{Req: id, ID: "l1"} })
	_, stopping := find[StopScope](p.last)
	require.True(t, stopping)
	p.exit(run, killedBy(15))
	assert.Equal(t, Drained, p.reply(drain).Drain.Outcome)
	assert.Equal(t, Stopped, p.m.State())
}

// An engine that exits on its own during a drain, its exit held for
// systemd's word: the drain ends when that exit is settled, and no
// restart follows it.
func TestAnExitHeldDuringADrainEndsItWithoutARestart(t *testing.T) {
	p := newPool(t, nil)
	run := p.ready()
	id, err := p.lease("a")
	require.NoError(t, err)
	drain := p.request(func(r ReqID) Event { return DrainRequested{Req: r, Deadline: time.Minute} })
	p.exit(run, killedBy(15))
	require.Contains(t, p.timers, TimerHoldExit, "the exit is held for systemd")

	p.request(func(r ReqID) Event { return LeaseReleased{Req: r, ID: id} })
	p.noReply(drain)
	assert.Equal(t, Draining, p.m.State())

	p.fire(TimerHoldExit)
	assert.Equal(t, Drained, p.reply(drain).Drain.Outcome)
	assert.Equal(t, Stopped, p.m.State())
	assert.NotContains(t, p.timers, TimerRestart, "no restart after a drain")
	assert.False(t, p.m.tr.Status(p.now).Pending)
}

// Where the engine tells its own requests in flight (ProgressURL=), a
// drain whose leases are gone reads them at once, and stops the engine
// only when none is left or at its deadline: a request that holds no lease
// is not cut.
func TestADrainWaitsForTheEnginesOwnRequestsInFlight(t *testing.T) {
	for _, tc := range []struct {
		name string
		// samples: the engine's requests in flight, read after read.
		samples []float64
		err     error
		// deadline: the drain's deadline passes before the last sample.
		deadline bool
		outcome  string
	}{
		{name: "none in flight: stopped at the first read", samples: []float64{0}, outcome: Drained},
		{name: "two in flight, then one, then none", samples: []float64{2, 1, 0}, outcome: Drained},
		{name: "an unreadable endpoint cannot hold the drain", samples: []float64{0}, err: errors.New("404"), outcome: Drained},
		{name: "still in flight at the deadline: forced", samples: []float64{1, 1}, deadline: true, outcome: Forced},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newPool(t, func(c *Config) { c.DrainRequests = true })
			run := p.ready()
			id, err := p.lease("router")
			require.NoError(t, err)
			req := p.request(func(id ReqID) Event { return DrainRequested{Req: id, Deadline: 30 * time.Second} })
			p.advance(time.Second)
			p.request(func(r ReqID) Event { return LeaseReleased{Req: r, ID: id} })
			read, ok := find[ReadProgress](p.last)
			require.True(t, ok, "the leases gone, the engine's metrics are read at once")
			assert.Equal(t, run, read.Run)
			_, stopping := find[StopScope](p.last)
			assert.False(t, stopping, "not before the engine says")
			for i, n := range tc.samples {
				last := i == len(tc.samples)-1
				if tc.deadline && last {
					p.fire(TimerDrainDeadline)
				} else {
					p.advance(time.Second)
					p.step(Progress{Run: run, InFlight: n, Err: tc.err})
				}
				_, stopping := find[StopScope](p.last)
				assert.Equal(t, last, stopping, "read %d (%g in flight)", i, n)
				assert.Equal(t, Draining, p.m.State())
			}
			p.exit(run, killedBy(syscall.SIGTERM))
			rep := p.reply(req)
			require.NoError(t, rep.Err)
			assert.Equal(t, tc.outcome, rep.Drain.Outcome)
			assert.Equal(t, Stopped, p.m.State())
		})
	}
}

// Stop is a drain with no deadline: it does not wait for requests.
func TestStopDoesNotWaitForRequestsInFlight(t *testing.T) {
	p := newPool(t, func(c *Config) { c.DrainRequests = true })
	p.ready()
	p.request(func(id ReqID) Event { return DrainRequested{Req: id} })
	_, read := find[ReadProgress](p.last)
	assert.False(t, read)
	_, stopping := find[StopScope](p.last)
	assert.True(t, stopping)
}

// A reload's drain waits the same way before it stages and stops the old
// engine; requests still in flight at its deadline give the reload up.
func TestAReloadWaitsForRequestsInFlightAndGivesUpAtItsDeadline(t *testing.T) {
	p := newPool(t, func(c *Config) { c.DrainRequests = true })
	run := p.ready()
	req := p.request(func(id ReqID) Event {
		return ReloadRequested{Req: id, Ref: "n.gguf", Deadline: 10 * time.Second}
	})
	_, ok := find[ReadProgress](p.last)
	require.True(t, ok)
	_, staging := find[Stage](p.last)
	assert.False(t, staging, "not while the old engine serves")
	p.step(Progress{Run: run, InFlight: 1})
	p.fire(TimerDrainDeadline)
	rep := p.reply(req)
	require.ErrorIs(t, rep.Err, ErrDrainTimeout)
	assert.Contains(t, rep.Err.Error(), "requests still in flight")
	assert.Equal(t, Ready, p.m.State(), "the old engine goes on serving")
}

// Like systemctl stop, a Stop (a drain) is answered once nothing of the
// engine's scope runs: its shim reports the engine's exit before it
// leaves the scope itself, and systemd's stop job ends after that.
func TestStopAnswersOnceTheScopeIsGone(t *testing.T) {
	p := newPool(t, nil)
	run := p.ready()
	req := p.request(func(id ReqID) Event { return DrainRequested{Req: id} })
	stop, ok := find[StopScope](p.last)
	require.True(t, ok, "the engine's scope is stopped")
	require.Equal(t, run, stop.Run)

	p.advance(3 * time.Millisecond)
	p.step(Exited{Run: run, Exit: Exit{Status: syscall.WaitStatus(syscall.SIGTERM), At: p.now}})
	p.noReply(req)
	assert.Equal(t, Draining, p.m.State(), "draining until the scope is gone")
	assert.False(t, p.m.View(p.now).Live)

	p.step(ScopeStopped{Run: run + 1})
	p.noReply(req)

	p.advance(2 * time.Millisecond)
	p.step(ScopeStopped{Run: run})
	rep := p.reply(req)
	require.NoError(t, rep.Err)
	assert.Equal(t, Drained, rep.Drain.Outcome)
	assert.Equal(t, p.now, rep.Drain.Done, "done when the scope is")
	assert.Equal(t, Stopped, p.m.State())
}
