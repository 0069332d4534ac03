package lifecycle

import (
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func (p *pool) reload(ref, digest string, deadline time.Duration) ReqID {
	return p.request(func(id ReqID) Event {
		return ReloadRequested{Req: id, Ref: ref, Digest: digest, Deadline: deadline}
	})
}

func TestReloadOfTheRunningModelRestartsNothing(t *testing.T) {
	p := newPool(t, nil)
	p.ready()
	req := p.reload("m.gguf", "sha256:a", time.Minute)
	rep := p.reply(req)
	require.NoError(t, rep.Err)
	assert.True(t, rep.Same)
	_, stopped := find[StopScope](p.last)
	_, staging := find[Stage](p.last)
	assert.False(t, stopped || staging)
	assert.Equal(t, Ready, p.m.State())
}

func TestReloadSwapsTheEngine(t *testing.T) {
	p := newPool(t, nil)
	old := p.ready()
	_, err := p.lease("router")
	require.NoError(t, err)
	req := p.reload("new.gguf", "sha256:b", time.Minute)
	assert.Equal(t, Draining, p.m.State())
	_, staging := find[Stage](p.last)
	assert.False(t, staging, "the model is staged once the leases are gone")

	lease := func() string {
		for id := range p.m.Leases() {
			return id
		}
		return ""
	}()
	p.request(func(r ReqID) Event { return LeaseReleased{Req: r, ID: lease} })
	stage, ok := find[Stage](p.last)
	require.True(t, ok)
	assert.Equal(t, Stage{Run: stage.Run, Ref: "new.gguf", Want: "sha256:b"}, stage)
	_, stopping := find[StopScope](p.last)
	assert.False(t, stopping, "the old engine runs on while the model stages: a staging failure must change nothing")

	p.step(ModelStaged{Run: stage.Run, Staged: staged("new.gguf", "sha256:b")})
	stop, ok := find[StopScope](p.last)
	require.True(t, ok)
	assert.Equal(t, old, stop.Run)
	p.exit(old, killedBy(15))
	assert.Zero(t, p.m.View(p.now).Policy.CrashCount, "the old engine's stop is no crash")

	cand := p.launchStaged(staged("new.gguf", "sha256:b"), 200)
	launch, _ := find[Launch](p.last)
	_ = launch
	p.noReply(req)
	p.step(Healthy{Run: cand})
	rep := p.reply(req)
	require.NoError(t, rep.Err)
	v := p.m.View(p.now)
	assert.Equal(t, Ready, v.State)
	assert.True(t, v.Ready)
	assert.False(t, v.Draining)
	assert.Equal(t, "new.gguf", v.Model)
	assert.Equal(t, "sha256:b", v.ModelDigest)
	rec, ok := find[WriteRecord](p.last)
	require.True(t, ok)
	assert.Equal(t, WriteRecord{Run: cand, Model: "new.gguf"}, rec)
}

func TestReloadThatChangesNothing(t *testing.T) {
	for _, tc := range []struct {
		name   string
		leases bool
		// fail makes the reload fail after the request.
		fail   func(p *pool)
		err    error
		reason string
	}{
		{name: "leases held at the drain deadline", leases: true, fail: func(p *pool) { p.fire(TimerDrainDeadline) },
			err: ErrDrainTimeout, reason: "drain_timeout"},
		{name: "the model cannot be staged", fail: func(p *pool) {
			stage, _ := find[Stage](p.last)
			p.step(ModelStaged{Run: stage.Run, Err: errors.New("disk full")})
		}, err: ErrReloadFailed, reason: "stage"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newPool(t, nil)
			p.ready()
			if tc.leases {
				_, err := p.lease("router")
				require.NoError(t, err)
			}
			req := p.reload("new.gguf", "sha256:b", time.Minute)
			tc.fail(p)
			rep := p.reply(req)
			assert.ErrorIs(t, rep.Err, tc.err)
			assert.Equal(t, tc.reason, rep.Reason)
			_, stopped := find[StopScope](p.last)
			assert.False(t, stopped, "the old engine is untouched")
			v := p.m.View(p.now)
			assert.Equal(t, Ready, v.State)
			assert.True(t, v.Ready, "the pool serves on its old engine")
			assert.Equal(t, "m.gguf", v.Model)
			assert.Equal(t, map[bool]uint32{true: 1, false: 0}[tc.leases], v.ActiveLeases, "leases are kept")
		})
	}
}

// A new engine that fails goes, the old model comes back, and only then
// does the caller hear that it rolled back and why.
func TestReloadRollsBack(t *testing.T) {
	for _, tc := range []struct {
		name   string
		fail   func(p *pool, cand RunID)
		reason string
		why    string
	}{
		{name: "the new engine crashes", fail: func(p *pool, cand RunID) { p.exit(cand, exitStatus(7)) },
			reason: "crash", why: "the new engine exited with status 7"},
		{name: "the new engine fails its start timeout", fail: func(p *pool, cand RunID) {
			p.step(StartTimedOut{Run: cand, Err: errors.New("not healthy within StartTimeoutSec=5s")})
			stop, ok := find[StopScope](p.last)
			require.True(p.t, ok)
			require.Equal(p.t, cand, stop.Run)
			p.exit(cand, killedBy(15))
		}, reason: "start_timeout", why: "not healthy within StartTimeoutSec=5s"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newPool(t, nil)
			old := p.ready()
			req := p.reload("new.gguf", "sha256:b", time.Minute)
			stage, _ := find[Stage](p.last)
			p.step(ModelStaged{Run: stage.Run, Staged: staged("new.gguf", "sha256:b")})
			p.exit(old, killedBy(15))
			cand := p.launchStaged(staged("new.gguf", "sha256:b"), 200)
			tc.fail(p, cand)
			p.noReply(req)
			stage, ok := find[Stage](p.last)
			require.True(t, ok, "the old model starts again")
			assert.Equal(t, "m.gguf", stage.Ref)
			back := p.launchStaged(staged("m.gguf", "sha256:a"), 300)
			launch, _ := find[Launch](p.last)
			assert.False(t, launch.Candidate)
			p.noReply(req)
			p.step(Healthy{Run: back})
			rep := p.reply(req)
			assert.ErrorIs(t, rep.Err, ErrReloadFailed)
			assert.Contains(t, rep.Err.Error(), "rolled back to m.gguf")
			assert.Contains(t, rep.Err.Error(), tc.why)
			assert.NotContains(t, rep.Err.Error(), "not serving again")
			assert.Equal(t, tc.reason, rep.Reason)
			v := p.m.View(p.now)
			assert.Equal(t, Ready, v.State)
			assert.Equal(t, "m.gguf", v.Model)
			assert.Zero(t, v.Policy.CrashCount, "a failed candidate is the reload's failure, not a crash")
		})
	}
}

func TestReloadIsOneAtATime(t *testing.T) {
	p := newPool(t, nil)
	p.ready()
	_, err := p.lease("router")
	require.NoError(t, err)
	p.reload("new.gguf", "sha256:b", time.Minute)
	assert.ErrorIs(t, p.reply(p.reload("other.gguf", "sha256:c", time.Minute)).Err, ErrBusy)
	assert.ErrorIs(t, p.reply(p.request(func(id ReqID) Event { return DrainRequested{Req: id} })).Err, ErrBusy)
	assert.ErrorIs(t, p.reply(p.request(func(id ReqID) Event { return StartRequested{Req: id} })).Err, ErrBusy)
}
