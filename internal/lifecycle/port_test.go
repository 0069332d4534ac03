package lifecycle

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const squatter = "port 8080 on 127.0.0.1 is held by a socket of uid 65534 outside pool-engine-p.scope (inode 7, listening on 0.0.0.0:8080, in cgroup /user.slice/x.scope, pid 4242)"

// A restart that finds the engine's port held by another process is no
// crash: the pool is held, says who holds the port, and looks again after
// PortRetry; the breaker and the crash streak do not move.
func TestARestartOnAHeldPortWaitsWithoutFeedingTheBreaker(t *testing.T) {
	p := newPool(t, nil)
	run := p.ready()
	p.exit(run, exitStatus(1))
	before := p.m.View(p.now).Policy
	p.fire(TimerRestart)
	stage, _ := find[Stage](p.last)
	p.step(ModelStaged{Run: stage.Run, Staged: staged("m.gguf", "sha256:a")})
	launch, _ := find[Launch](p.last)
	p.step(StartFailed{Run: launch.Run, Err: fmt.Errorf("%s: %w", squatter, ErrPortBusy)})
	v := p.m.View(p.now)
	assert.Equal(t, Failed, v.State)
	assert.Contains(t, v.LastError, "pid 4242")
	assert.Equal(t, before.CrashCount, v.Policy.CrashCount, "not a crash of ours")
	assert.Equal(t, before.Streak, v.Policy.Streak)
	assert.Equal(t, before.Breaker, v.Policy.Breaker)
	require.Contains(t, p.timers, TimerRetry)
	assert.Equal(t, p.now.Add(PortRetry), p.timers[TimerRetry].At, "a port is looked at again soon")
	p.fire(TimerRetry)
	_, staging := find[Stage](p.last)
	assert.True(t, staging, "it looks again")
}

// An engine that never answered and exited while another process held
// its port failed to bind: no crash, the pool is held and starts again
// once the port is free. Once it has answered, an exit is its own.
func TestAnExitOnAHeldPortBeforeTheFirstAnswerIsNoCrash(t *testing.T) {
	p := newPool(t, nil)
	req := p.request(func(id ReqID) Event { return StartRequested{Req: id} })
	run := p.launchStaged(staged("m.gguf", "sha256:a"), 100)
	require.NoError(t, p.reply(req).Err)
	x := exitStatus(1)
	x.PortHeld = squatter
	p.exit(run, x)
	v := p.m.View(p.now)
	assert.Equal(t, Failed, v.State)
	assert.Contains(t, v.LastError, "could not listen")
	assert.Contains(t, v.LastError, "pid 4242")
	assert.Zero(t, v.Policy.CrashCount)
	assert.Zero(t, v.Policy.Streak)
	assert.Equal(t, "closed", v.Policy.Breaker.String(), "the breaker is not fed")
	assert.False(t, v.Live)
	assert.NotContains(t, p.timers, TimerRestart)
	require.Contains(t, p.timers, TimerRetry)
	p.fire(TimerRetry)
	again := p.launchStaged(staged("m.gguf", "sha256:a"), 101)
	p.step(Healthy{Run: again})
	assert.Equal(t, Ready, p.m.State())

	x.At = p.now
	p.exit(again, x)
	v = p.m.View(p.now)
	assert.Equal(t, uint64(1), v.Policy.CrashCount, "an engine that served crashed on its own")
}

// A check before the start that could not make sure of everything says
// so in LastError; the engine starts.
func TestACautionOfTheStartIsTheLastError(t *testing.T) {
	p := newPool(t, nil)
	p.request(func(id ReqID) Event { return StartRequested{Req: id} })
	stage, _ := find[Stage](p.last)
	p.step(ModelStaged{Run: stage.Run, Staged: staged("m.gguf", "sha256:a")})
	launch, _ := find[Launch](p.last)
	p.step(EngineStarted{Run: launch.Run, PID: 100, Caution: "could not check 3 processes of other users"})
	v := p.m.View(p.now)
	assert.True(t, v.Live)
	assert.Equal(t, "could not check 3 processes of other users", v.LastError)
}

// A caution does not hide why the engine was restarted: the crash's
// reason stays the LastError of the restart it caused.
func TestACautionKeepsTheCrashReason(t *testing.T) {
	p := newPool(t, nil)
	run := p.ready()
	p.exit(run, exitStatus(3))
	reason := p.m.View(p.now).LastError
	require.NotEmpty(t, reason)
	p.fire(TimerRestart)
	stage, _ := find[Stage](p.last)
	p.step(ModelStaged{Run: stage.Run, Staged: staged("m.gguf", "sha256:a")})
	launch, _ := find[Launch](p.last)
	p.step(EngineStarted{Run: launch.Run, PID: 101, Caution: "could not check 3 processes of other users"})
	assert.Equal(t, reason, p.m.View(p.now).LastError)
}
