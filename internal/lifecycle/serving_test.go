package lifecycle

import (
	"errors"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/crash"
)

// The stall table: what the engine's counters do over time, and whether
// the pool is restarted as stalled.
func TestStallDetection(t *testing.T) {
	type sample struct {
		after            time.Duration
		inFlight, tokens float64
		err              error
	}
	for _, tc := range []struct {
		name     string
		samples  []sample
		noAnswer bool
		stalled  bool
	}{
		{name: "idle: nothing in flight for an hour", samples: []sample{{0, 0, 10, nil}, {30 * time.Minute, 0, 10, nil}, {30 * time.Minute, 0, 10, nil}}},
		{name: "busy: in flight for 3x StallSec, the count moving", samples: []sample{
			{0, 4, 10, nil}, {50 * time.Second, 4, 11, nil}, {50 * time.Second, 4, 12, nil}, {50 * time.Second, 4, 13, nil}, {50 * time.Second, 4, 14, nil}}},
		{name: "stalled: in flight, no token for StallSec", samples: []sample{{0, 1, 10, nil}, {30 * time.Second, 1, 10, nil}, {30 * time.Second, 1, 10, nil}}, stalled: true},
		{name: "not yet: in flight, no token for less than StallSec", samples: []sample{{0, 1, 10, nil}, {59 * time.Second, 1, 10, nil}}},
		{name: "the clock starts when work arrives, not when the count last moved", samples: []sample{
			{0, 0, 10, nil}, {10 * time.Minute, 0, 10, nil}, {10 * time.Second, 1, 10, nil}, {50 * time.Second, 1, 10, nil}}},
		{name: "an unreadable metrics endpoint never crashes the pool", samples: []sample{
			{0, 0, 0, errors.New("404")}, {time.Hour, 0, 0, errors.New("404")}}},
		{name: "metrics that stop answering with work in flight: a stall", noAnswer: true, samples: []sample{
			{0, 1, 10, nil}, {30 * time.Second, 0, 0, errors.New("no answer")}, {30 * time.Second, 0, 0, errors.New("no answer")}}, stalled: true},
		{name: "metrics that stop answering while idle: reported, no stall", noAnswer: true, samples: []sample{
			{0, 0, 10, nil}, {30 * time.Second, 0, 0, errors.New("no answer")}, {time.Hour, 0, 0, errors.New("no answer")}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newPool(t, func(c *Config) { c.Stall = time.Minute })
			run := p.ready()
			stopped, logs := false, 0
			for _, s := range tc.samples {
				p.advance(s.after)
				acts := p.step(Progress{Run: run, InFlight: s.inFlight, Tokens: s.tokens, Err: s.err, NoAnswer: tc.noAnswer && s.err != nil})
				if _, ok := find[StopScope](acts); ok {
					stopped = true
				}
				logs += len(all[Log](acts))
			}
			assert.Equal(t, tc.stalled, stopped)
			if tc.samples[0].err != nil || (tc.noAnswer && !tc.stalled) {
				assert.Equal(t, 1, logs, "an unusable endpoint is reported once")
			}
			if !tc.stalled {
				assert.True(t, p.m.View(p.now).Ready)
				return
			}
			p.exit(run, killedBy(syscall.SIGTERM))
			v := p.m.View(p.now)
			assert.Equal(t, crash.Stalled, v.LastReason)
			assert.Contains(t, v.LastError, "stalled: 1 request(s) in flight and no token for 1m0s (tokens stayed at 10)")
			assert.Equal(t, Backoff, v.State)
			e := crashEntries(p.last)
			require.Len(t, e, 1)
			assert.Equal(t, crash.Stalled, e[0].Reason)
		})
	}
}

// A reload's new engine warms up too: the reload answers only once it
// has, and a failed warm-up rolls the reload back.
func TestAReloadsNewEngineWarmsUp(t *testing.T) {
	for _, ok := range []bool{true, false} {
		p := newPool(t, func(c *Config) { c.Warmup = true })
		req := p.request(func(id ReqID) Event { return StartRequested{Req: id} })
		old := p.launchStaged(staged("m.gguf", "sha256:a"), 100)
		require.NoError(t, p.reply(req).Err)
		p.step(Healthy{Run: old})
		p.step(WarmedUp{Run: old})
		req = p.reload("new.gguf", "sha256:b", time.Minute)
		stage, _ := find[Stage](p.last)
		p.step(ModelStaged{Run: stage.Run, Staged: staged("new.gguf", "sha256:b")})
		p.exit(old, killedBy(syscall.SIGTERM))
		cand := p.launchStaged(staged("new.gguf", "sha256:b"), 200)
		p.step(Healthy{Run: cand})
		_, warming := find[Warmup](p.last)
		require.True(t, warming)
		assert.Equal(t, Warming, p.m.State())
		p.noReply(req)
		if ok {
			p.step(WarmedUp{Run: cand})
			require.NoError(t, p.reply(req).Err)
			assert.Equal(t, "new.gguf", p.m.View(p.now).Model)
			continue
		}
		p.step(WarmedUp{Run: cand, Err: errors.New("POST /completion answered 500")})
		p.exit(cand, killedBy(syscall.SIGTERM))
		back := p.launchStaged(staged("m.gguf", "sha256:a"), 300)
		p.step(Healthy{Run: back})
		p.step(WarmedUp{Run: back})
		rep := p.reply(req)
		assert.ErrorIs(t, rep.Err, ErrReloadFailed)
		assert.Contains(t, rep.Err.Error(), "warm-up request failed: POST /completion answered 500")
		assert.Equal(t, "start_timeout", rep.Reason)
	}
}

func TestAFailedWarmupIsAStartFailure(t *testing.T) {
	p := newPool(t, func(c *Config) { c.Warmup = true })
	req := p.request(func(id ReqID) Event { return StartRequested{Req: id} })
	run := p.launchStaged(staged("m.gguf", "sha256:a"), 100)
	require.NoError(t, p.reply(req).Err)
	p.step(Healthy{Run: run})
	p.step(WarmedUp{Run: run, Err: errors.New("no answer within WarmupTimeoutSec=60s")})
	_, stopping := find[StopScope](p.last)
	require.True(t, stopping)
	p.exit(run, killedBy(syscall.SIGTERM))
	v := p.m.View(p.now)
	assert.Equal(t, crash.StartFailure, v.LastReason)
	assert.Contains(t, v.LastError, "warm-up request failed")
}
