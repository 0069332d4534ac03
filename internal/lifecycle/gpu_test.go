package lifecycle

import (
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/crash"
)

const lost = "GPU GPU-1 needs a reset: Xid 79 (the GPU has fallen off the bus); remedy: reset the GPU or reboot"

// A GPU that needs a reset holds its pool failed: the engine goes (one
// driver_xid crash), no restart loop, until the GPU is usable again.
func TestAGPUThatNeedsAResetHoldsThePool(t *testing.T) {
	for _, lift := range []string{"usable", "AllowRestart"} {
		t.Run(lift, func(t *testing.T) {
			p := newPool(t, nil)
			run := p.ready()
			p.step(GPUUnhealthy{GPU: "GPU-1", Why: lost})
			_, stopping := find[StopScope](p.last)
			require.True(t, stopping, "the engine on a bad GPU goes")
			p.exit(run, killedBy(syscall.SIGTERM))
			v := p.m.View(p.now)
			assert.Equal(t, Failed, v.State)
			assert.Equal(t, crash.DriverXID, v.LastReason)
			assert.Contains(t, v.LastError, lost)
			assert.Equal(t, uint64(1), v.Policy.CrashCount)
			assert.NotContains(t, p.timers, TimerRestart, "no restart loop against a dead GPU")
			rep := p.reply(p.request(func(id ReqID) Event { return StartRequested{Req: id} }))
			assert.ErrorIs(t, rep.Err, ErrGPUUnhealthy)

			if lift == "usable" {
				p.step(GPUUsable{GPU: "GPU-0"})
				assert.NotContains(t, p.timers, TimerRestart, "another GPU's word changes nothing")
				p.step(GPUUsable{GPU: "GPU-1"})
			} else {
				require.NoError(t, p.reply(p.request(func(id ReqID) Event { return AllowRestartRequested{Req: id} })).Err)
			}
			require.Contains(t, p.timers, TimerRestart)
			p.fire(TimerRestart)
			_, staging := find[Stage](p.last)
			assert.True(t, staging, "restarted once the hold is lifted")
		})
	}
}

func TestAStoppedPoolOnAnUnhealthyGPUDoesNotStart(t *testing.T) {
	p := newPool(t, nil)
	p.step(GPUUnhealthy{GPU: "GPU-1", Why: lost})
	assert.Equal(t, Failed, p.m.State())
	assert.ErrorIs(t, p.reply(p.request(func(id ReqID) Event { return StartRequested{Req: id} })).Err, ErrGPUUnhealthy)
	p.step(GPUUsable{GPU: "GPU-1"})
	assert.Equal(t, Stopped, p.m.State())
	p.request(func(id ReqID) Event { return StartRequested{Req: id} })
	_, staging := find[Stage](p.last)
	assert.True(t, staging, "it starts once the GPU is usable")
}

// A restart that finds another process on its GPUs is no crash: it says
// who holds them and looks again later.
func TestARestartOnBusyGPUsWaitsWithoutCountingACrash(t *testing.T) {
	p := newPool(t, nil)
	run := p.ready()
	p.exit(run, exitStatus(1))
	p.fire(TimerRestart)
	stage, _ := find[Stage](p.last)
	p.step(ModelStaged{Run: stage.Run, Staged: staged("m.gguf", "sha256:a")})
	launch, _ := find[Launch](p.last)
	busy := fmt.Errorf("GPU GPU-0 in use by pid 4242 (python3, user.slice): %w", ErrGPUBusy)
	p.step(StartFailed{Run: launch.Run, Err: busy})
	v := p.m.View(p.now)
	assert.Equal(t, uint64(1), v.Policy.CrashCount, "not a crash of ours")
	assert.Equal(t, Failed, v.State)
	assert.Contains(t, v.LastError, "pid 4242 (python3")
	require.Contains(t, p.timers, TimerRetry)
	p.fire(TimerRetry)
	_, staging := find[Stage](p.last)
	assert.True(t, staging, "it looks again")
	assert.Equal(t, uint64(1), p.m.View(p.now).Policy.RestartCount, "the retry is the same restart")
}

// A GPU hold that calls off a reload's new engine before it launches
// rolls the reload back: the pool is Starting its old model, not Failed.
func TestAGPUHoldDuringAReloadsStartLeavesItsRollbackStarting(t *testing.T) {
	p := newPool(t, nil)
	old := p.ready()
	req := p.request(func(id ReqID) Event {
		return ReloadRequested{Req: id, Ref: "n.gguf", Digest: "sha256:b", Deadline: time.Minute}
	})
	stage, ok := find[Stage](p.last)
	require.True(t, ok)
	p.step(ModelStaged{Run: stage.Run, Staged: staged("n.gguf", "sha256:b")})
	p.exit(old, killedBy(15))
	cand, ok := find[Stage](p.last)
	require.True(t, ok, "the new engine's start stages: %v", p.last)

	p.step(GPUUnhealthy{GPU: "GPU-0", Why: "XID 79 on GPU-0"})
	back, ok := find[Stage](p.last)
	require.True(t, ok, "the old model starts again: %v", p.last)
	assert.NotEqual(t, cand.Run, back.Run)
	assert.Equal(t, Starting, p.m.State())
	assert.Equal(t, "rolling-back", p.m.View(p.now).Operation)
	p.noReply(req)
}
