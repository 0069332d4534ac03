package lifecycle

import (
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// parkLogged says whether acts journal the park with reason group.
func parkLogged(acts []Action) bool {
	for _, l := range all[Log](acts) {
		if l.Msg == "pool parked: its GPUs go to another pool of its group" {
			for i := 0; i+1 < len(l.Attrs); i += 2 {
				if l.Attrs[i+1] == ReasonGroup {
					return true
				}
			}
		}
	}
	return false
}

// A park is a drain whose leases are honoured up to its deadline and that
// ends Idle (reason group): no crash, no restart, and the next use starts
// the pool again.
func TestParkDrainsThenIdles(t *testing.T) {
	p := newPool(t, func(c *Config) { c.StartOnLease = true })
	run := p.ready()
	id, err := p.lease("client")
	require.NoError(t, err)
	req := p.request(func(r ReqID) Event { return ParkRequested{Req: r, Deadline: 30 * time.Second} })
	assert.Equal(t, Draining, p.m.State(), "the lease is honoured")
	_, stopping := find[StopScope](p.last)
	assert.False(t, stopping)
	p.noReply(req)
	p.advance(10 * time.Second)
	p.request(func(r ReqID) Event { return LeaseReleased{Req: r, ID: id} })
	_, stopping = find[StopScope](p.last)
	require.True(t, stopping, "the engine stops once its lease is given back")
	p.advance(time.Second)
	acts := p.exit(run, killedBy(15))
	rep := p.reply(req)
	require.NoError(t, rep.Err)
	assert.Equal(t, Drained, rep.Drain.Outcome)
	assert.True(t, parkLogged(acts), "journaled with reason group: %v", acts)
	v := p.m.View(p.now)
	assert.Equal(t, Idle, v.State)
	assert.Equal(t, p.now, v.IdleSince)
	assert.Zero(t, v.Policy.CrashCount)
	assert.NotContains(t, p.timers, TimerRestart)

	// Its next use starts it.
	ens := p.request(func(r ReqID) Event { return EnsureReadyRequested{Req: r} })
	assert.Equal(t, Starting, p.m.State())
	p.noReply(ens)
}

// A park's deadline revokes the leases still held and stops the engine.
func TestParkDeadlineRevokesLeases(t *testing.T) {
	p := newPool(t, nil)
	run := p.ready()
	_, err := p.lease("client")
	require.NoError(t, err)
	req := p.request(func(r ReqID) Event { return ParkRequested{Req: r, Deadline: 5 * time.Second} })
	require.Contains(t, p.timers, TimerDrainDeadline)
	assert.Equal(t, p.now.Add(5*time.Second), p.timers[TimerDrainDeadline].At)
	p.advance(5 * time.Second)
	acts := p.fire(TimerDrainDeadline)
	_, stopping := find[StopScope](acts)
	require.True(t, stopping)
	p.exit(run, killedBy(9))
	rep := p.reply(req)
	assert.Equal(t, Forced, rep.Drain.Outcome)
	assert.Equal(t, 1, rep.Drain.Revoked)
	assert.Equal(t, Idle, p.m.State())
}

// A pool with no engine (stopped, in backoff) parks at once; an idle one
// is parked already; a drain under way is joined and ends as a drain.
func TestParkWithoutEngine(t *testing.T) {
	p := newPool(t, nil)
	req := p.request(func(r ReqID) Event { return ParkRequested{Req: r} })
	require.NoError(t, p.reply(req).Err)
	assert.Equal(t, Idle, p.m.State(), "a stopped pool is parked")
	assert.True(t, parkLogged(p.last))
	req = p.request(func(r ReqID) Event { return ParkRequested{Req: r} })
	require.NoError(t, p.reply(req).Err)
	assert.Equal(t, Idle, p.m.State())

	p = newPool(t, nil)
	run := p.ready()
	p.exit(run, exitStatus(3))
	require.Equal(t, Backoff, p.m.State())
	req = p.request(func(r ReqID) Event { return ParkRequested{Req: r} })
	require.NoError(t, p.reply(req).Err)
	assert.Equal(t, Idle, p.m.State(), "a pool in backoff is parked, its restart cancelled")
	assert.NotContains(t, p.timers, TimerRestart)

	p = newPool(t, nil)
	run = p.ready()
	_, err := p.lease("client")
	require.NoError(t, err)
	drain := p.request(func(r ReqID) Event { return DrainRequested{Req: r, Deadline: time.Minute} })
	park := p.request(func(r ReqID) Event { return ParkRequested{Req: r, Deadline: time.Second} })
	p.advance(time.Second)
	p.fire(TimerDrainDeadline)
	p.exit(run, killedBy(9))
	p.reply(drain)
	p.reply(park)
	assert.Equal(t, Stopped, p.m.State(), "the operator's drain stops the pool")
}

// A park of an awake pool with Sleep=vllm drains it (its lease honoured,
// then the engine's own requests in flight) and puts its engine to sleep
// instead of stopping it; the park is answered only once the engine says
// it sleeps, and the pool ends Sleeping (reason group), its next use
// waking the same engine.
func TestParkPutsASleepCapableEngineToSleep(t *testing.T) {
	p := sleepPool(t, func(c *Config) { c.DrainRequests = true })
	run := p.ready()
	id, err := p.lease("client")
	require.NoError(t, err)
	req := p.request(func(r ReqID) Event { return ParkRequested{Req: r, Deadline: time.Minute} })
	assert.Equal(t, Draining, p.m.State())
	assert.Empty(t, all[Sleep](p.last), "the lease is honoured first")
	p.advance(time.Second)
	p.request(func(r ReqID) Event { return LeaseReleased{Req: r, ID: id} })
	_, reading := find[ReadProgress](p.last)
	require.True(t, reading, "its requests in flight are read: %v", p.last)
	assert.Empty(t, all[Sleep](p.last))
	p.step(Progress{Run: run, InFlight: 1, Tokens: 5})
	assert.Empty(t, all[Sleep](p.last), "a request in flight is waited for")
	p.step(Progress{Run: run, InFlight: 0, Tokens: 9})
	sl, ok := find[Sleep](p.last)
	require.True(t, ok, "the engine is asked to sleep: %v", p.last)
	assert.Equal(t, Sleep{Run: run, Level: 2}, sl)
	assert.Empty(t, all[StopScope](p.last), "not stopped")
	assert.Equal(t, Draining, p.m.State())
	p.noReply(req)

	p.advance(2 * time.Second)
	acts := p.step(Slept{Run: run})
	rep := p.reply(req)
	require.NoError(t, rep.Err)
	assert.Equal(t, Drained, rep.Drain.Outcome)
	assert.True(t, parkLogged(acts), "journaled with reason group: %v", acts)
	v := p.m.View(p.now)
	assert.Equal(t, Sleeping, v.State)
	assert.False(t, v.Draining)
	assert.Equal(t, 100, v.MainPID, "the same engine")
	assert.Equal(t, p.now, v.IdleSince)
	assert.Zero(t, v.Policy.CrashCount)

	// Parked again: answered at once. Its next use wakes it.
	again := p.request(func(r ReqID) Event { return ParkRequested{Req: r, Deadline: time.Minute} })
	require.NoError(t, p.reply(again).Err)
	ens := p.request(func(r ReqID) Event { return EnsureReadyRequested{Req: r} })
	wake, ok := find[Wake](p.last)
	require.True(t, ok, "%v", p.last)
	assert.Equal(t, run, wake.Run)
	p.step(Woke{Run: run})
	require.NoError(t, p.reply(ens).Err)
	assert.Equal(t, Ready, p.m.State())
}

// A park whose engine refuses to sleep stops it, as idleness does: the
// park is answered once the engine is gone, the pool Idle, no crash.
func TestParkWhoseSleepFailsStopsTheEngine(t *testing.T) {
	p := sleepPool(t, nil)
	run := p.ready()
	req := p.request(func(r ReqID) Event { return ParkRequested{Req: r, Deadline: time.Minute} })
	_, ok := find[Sleep](p.last)
	require.True(t, ok, "%v", p.last)
	p.step(Slept{Run: run, Err: errors.New("500 Internal Server Error")})
	stop, ok := find[StopScope](p.last)
	require.True(t, ok, "stopped instead: %v", p.last)
	assert.Equal(t, run, stop.Run)
	p.noReply(req)
	acts := p.exit(run, killedBy(15))
	require.NoError(t, p.reply(req).Err)
	assert.True(t, parkLogged(acts))
	v := p.m.View(p.now)
	assert.Equal(t, Idle, v.State)
	assert.Contains(t, v.LastError, "sleep failed")
	assert.Zero(t, v.Policy.CrashCount)
}

// An operator's Stop during a park's sleep wins: the engine is stopped
// and the pool ends stopped, not asleep nor idle.
func TestStopDuringAParksSleepStopsThePool(t *testing.T) {
	p := sleepPool(t, nil)
	run := p.ready()
	park := p.request(func(r ReqID) Event { return ParkRequested{Req: r, Deadline: time.Minute} })
	stop := p.request(func(r ReqID) Event { return DrainRequested{Req: r} })
	_, ok := find[StopScope](p.last)
	require.True(t, ok, "%v", p.last)
	p.step(Slept{Run: run})
	p.exit(run, killedBy(15))
	require.NoError(t, p.reply(park).Err)
	require.NoError(t, p.reply(stop).Err)
	assert.Equal(t, Stopped, p.m.State())
}

// A pool already sleeping is parked already (its engine keeps little of
// the GPU's memory): the park is answered once its Sleep is, and the
// engine is neither stopped nor woken.
func TestParkOfASleepingPoolKeepsItAsleep(t *testing.T) {
	p := sleepPool(t, nil)
	run := p.ready()
	p.fire(TimerIdle)
	req := p.request(func(r ReqID) Event { return ParkRequested{Req: r, Deadline: time.Minute} })
	p.noReply(req)
	p.step(Slept{Run: run})
	require.NoError(t, p.reply(req).Err)
	req = p.request(func(r ReqID) Event { return ParkRequested{Req: r, Deadline: time.Minute} })
	require.NoError(t, p.reply(req).Err)
	assert.Empty(t, all[StopScope](p.last))
	assert.Equal(t, Sleeping, p.m.State())
	assert.Zero(t, p.m.View(p.now).Policy.CrashCount)
}

// A park of an idle pool starting on demand calls the start off: its
// callers hear it did not start, and do not wait on an idle pool that
// nothing starts.
func TestParkOfAPoolStartingOnDemandAnswersItsCallers(t *testing.T) {
	p := idlePool(t, nil)
	p.goneIdle(p.ready())
	ens := p.request(func(r ReqID) Event { return EnsureReadyRequested{Req: r} })
	require.Equal(t, Starting, p.m.State())
	park := p.request(func(r ReqID) Event { return ParkRequested{Req: r, Deadline: time.Minute} })
	require.NoError(t, p.reply(park).Err)
	assert.ErrorIs(t, p.reply(ens).Err, ErrNotReady)
	assert.Equal(t, Idle, p.m.State())
	assert.Empty(t, p.m.waiters)
}

// A second park joining a park under way (a turn that gave up waiting
// parks again) is still a park: the pool ends parked (asleep, or idle),
// not stopped as an operator's drain leaves it.
func TestParkJoiningAParkStaysAPark(t *testing.T) {
	p := sleepPool(t, nil)
	run := p.ready()
	_, err := p.lease("client")
	require.NoError(t, err)
	first := p.request(func(r ReqID) Event { return ParkRequested{Req: r, Deadline: time.Minute} })
	second := p.request(func(r ReqID) Event { return ParkRequested{Req: r, Deadline: time.Minute} })
	p.advance(time.Minute)
	p.fire(TimerDrainDeadline)
	assert.Empty(t, all[StopScope](p.last), "not stopped: %v", p.last)
	_, ok := find[Sleep](p.last)
	require.True(t, ok, "asked to sleep: %v", p.last)
	p.step(Slept{Run: run})
	require.NoError(t, p.reply(first).Err)
	require.NoError(t, p.reply(second).Err)
	assert.Equal(t, Sleeping, p.m.State())

	p = newPool(t, nil)
	run = p.ready()
	_, err = p.lease("client")
	require.NoError(t, err)
	first = p.request(func(r ReqID) Event { return ParkRequested{Req: r, Deadline: time.Minute} })
	second = p.request(func(r ReqID) Event { return ParkRequested{Req: r, Deadline: time.Minute} })
	p.advance(time.Minute)
	p.fire(TimerDrainDeadline)
	p.exit(run, killedBy(9))
	require.NoError(t, p.reply(first).Err)
	require.NoError(t, p.reply(second).Err)
	assert.Equal(t, Idle, p.m.State(), "parked, not stopped")
}

// An engine parked asleep for another member of its group that dies is a
// crash (counted), but the pool stays parked: no restart loads its model
// beside the member that has the GPUs; its next use starts it.
func TestACrashWhileParkedAsleepStaysParked(t *testing.T) {
	p := sleepPool(t, nil)
	run := p.ready()
	req := p.request(func(r ReqID) Event { return ParkRequested{Req: r, Deadline: time.Minute} })
	p.step(Slept{Run: run})
	require.NoError(t, p.reply(req).Err)
	require.Equal(t, Sleeping, p.m.State())
	p.advance(time.Second)
	p.exit(run, exitStatus(1))
	v := p.m.View(p.now)
	assert.Equal(t, Idle, v.State, "parked still")
	assert.EqualValues(t, 1, v.Policy.CrashCount, "a crash all the same")
	assert.NotContains(t, p.timers, TimerRestart)
	assert.Empty(t, all[Stage](p.last), "nothing starts: %v", p.last)

	ens := p.request(func(r ReqID) Event { return EnsureReadyRequested{Req: r} })
	assert.Equal(t, Starting, p.m.State(), "its next use starts it")
	p.noReply(ens)
}
