package lifecycle

import (
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

// A sleeping engine (Sleep=vllm) still holds its process on the GPU: a
// park stops it, and the pool ends Idle, not Sleeping.
func TestParkOfASleepingPoolStopsItsEngine(t *testing.T) {
	p := sleepPool(t, nil)
	run := p.ready()
	p.asleep(run)
	req := p.request(func(r ReqID) Event { return ParkRequested{Req: r, Deadline: time.Minute} })
	_, ok := find[StopScope](p.last)
	require.True(t, ok, "the sleeping engine is stopped: %v", p.last)
	acts := p.exit(run, killedBy(15))
	require.NoError(t, p.reply(req).Err)
	assert.Equal(t, Idle, p.m.State())
	assert.True(t, parkLogged(acts))
	assert.Zero(t, p.m.View(p.now).Policy.CrashCount)
}
