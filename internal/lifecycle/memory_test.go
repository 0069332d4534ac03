package lifecycle

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const noMemory = "GPU GPU-0 has 2G free of 80G, the pool needs 30G: held by pid 4242 (python3, 70G)"

// refuseLaunch answers the pending Stage, then the Launch with a start
// refused for want of GPU memory.
func (p *pool) refuseLaunch() {
	p.t.Helper()
	stage, ok := find[Stage](p.last)
	require.True(p.t, ok, "a Stage is out: %v", p.last)
	p.step(ModelStaged{Run: stage.Run, Staged: staged("m.gguf", "sha256:a")})
	launch, ok := find[Launch](p.last)
	require.True(p.t, ok, "a Launch follows the staging: %v", p.last)
	p.step(StartFailed{Run: launch.Run, Err: fmt.Errorf("%s: %w", noMemory, ErrNoGPUMemory)})
}

// A Start whose GPUs lack the memory is answered NoGPUMemory naming who
// holds it; no crash is counted, the streak and the breaker are
// untouched, and the pool looks again every MemoryRetry until the memory
// is free, then starts by itself.
func TestAStartWithoutGPUMemoryWaitsForItWithoutCountingACrash(t *testing.T) {
	p := newPool(t, nil)
	req := p.request(func(id ReqID) Event { return StartRequested{Req: id} })
	p.refuseLaunch()
	err := p.reply(req).Err
	require.ErrorIs(t, err, ErrNoGPUMemory)
	assert.ErrorContains(t, err, "pid 4242 (python3, 70G)")
	v := p.m.View(p.now)
	assert.Equal(t, Failed, v.State)
	assert.Contains(t, v.LastError, "the pool needs 30G")
	assert.Zero(t, v.Policy.CrashCount, "not a crash")
	assert.Zero(t, v.Policy.Streak, "the failure streak is untouched")
	assert.Equal(t, "closed", v.Policy.Breaker.String())
	require.Contains(t, p.timers, TimerRetry)
	assert.Equal(t, p.now.Add(MemoryRetry), p.timers[TimerRetry].At, "memory is looked at again within seconds")

	// Still held: it looks again, as often, as long as it takes.
	for range 10 {
		p.fire(TimerRetry)
		p.refuseLaunch()
		require.Contains(t, p.timers, TimerRetry)
	}
	assert.Zero(t, p.m.View(p.now).Policy.CrashCount)
	assert.Zero(t, p.m.View(p.now).Policy.Streak)

	// The memory is free: the next look starts the engine.
	p.fire(TimerRetry)
	run := p.launchStaged(staged("m.gguf", "sha256:a"), 100)
	p.step(Healthy{Run: run})
	assert.Equal(t, Ready, p.m.State())
	assert.Zero(t, p.m.View(p.now).Policy.CrashCount)
}

// A restart after a crash that finds no memory keeps the crash's streak
// as it was: the wait is not another failure.
func TestARestartWithoutGPUMemoryKeepsTheStreak(t *testing.T) {
	p := newPool(t, func(c *Config) { c.MemoryRetry = 7 * time.Second })
	run := p.ready()
	p.exit(run, exitStatus(1))
	streak := p.m.View(p.now).Policy.Streak
	require.Equal(t, 1, int(streak))
	p.fire(TimerRestart)
	p.refuseLaunch()
	v := p.m.View(p.now)
	assert.Equal(t, uint64(1), v.Policy.CrashCount, "only the crash")
	assert.Equal(t, streak, v.Policy.Streak)
	assert.Equal(t, p.now.Add(7*time.Second), p.timers[TimerRetry].At, "Config's MemoryRetry")
}

// An EnsureReady (or a lease) whose start is refused for want of memory
// is answered NoGPUMemory at once, with who holds it; the idle pool is
// idle again, its next use trying anew.
func TestEnsureReadyWithoutGPUMemoryIsToldWhoHoldsIt(t *testing.T) {
	p := idlePool(t, nil)
	run := p.ready()
	p.goneIdle(run)
	req := p.request(func(r ReqID) Event { return EnsureReadyRequested{Req: r} })
	p.noReply(req)
	p.refuseLaunch()
	err := p.reply(req).Err
	require.ErrorIs(t, err, ErrNoGPUMemory)
	assert.NotErrorIs(t, err, ErrNotReady)
	assert.ErrorContains(t, err, "pid 4242 (python3, 70G)")
	assert.Zero(t, p.m.View(p.now).Policy.CrashCount)

	assert.Equal(t, Idle, p.m.State())
	p.request(func(r ReqID) Event { return EnsureReadyRequested{Req: r} })
	p.launchStaged(staged("m.gguf", "sha256:a"), 101)
	assert.Equal(t, Starting, p.m.State())

	// Another kind of failed start is still NotReady.
	q := idlePool(t, nil)
	q.goneIdle(q.ready())
	req = q.request(func(r ReqID) Event { return EnsureReadyRequested{Req: r} })
	stage, _ := find[Stage](q.last)
	q.step(ModelStaged{Run: stage.Run, Staged: staged("m.gguf", "sha256:a")})
	launch, _ := find[Launch](q.last)
	q.step(StartFailed{Run: launch.Run, Err: fmt.Errorf("held: %w", ErrGPUBusy)})
	err = q.reply(req).Err
	assert.ErrorIs(t, err, ErrNotReady)
	assert.NotErrorIs(t, err, ErrNoGPUMemory)
}
