package lifecycle

import (
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/crash"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/policy"
	"github.com/llorch/pool-managerd/internal/witness"
)

// crashEntries returns the crash entries journaled by acts.
func crashEntries(acts []Action) []policy.Crashed {
	var out []policy.Crashed
	for _, j := range all[Journal](acts) {
		for _, e := range j.Events {
			if c, ok := e.(policy.Crashed); ok {
				out = append(out, c)
			}
		}
	}
	return out
}

func unit(kind witness.Kind, cause witness.Cause) Event {
	return UnitChanged{Event: witness.Event{Kind: kind, Cause: cause, Invocation: "inv-now"}}
}

// Each exit is counted once, whichever witness speaks first, and
// classified by what both say.
func TestEveryExitIsClassifiedOnceWhicheverWitnessSpeaksFirst(t *testing.T) {
	type step func(p *pool, run RunID)
	shim := func(x Exit) step { return func(p *pool, run RunID) { p.exit(run, x) } }
	systemd := func(k witness.Kind, c witness.Cause) step { return func(p *pool, run RunID) { p.step(unit(k, c)) } }
	hold := func(p *pool, _ RunID) { p.fire(TimerHoldExit) }
	for _, tc := range []struct {
		name   string
		steps  []step
		state  State
		reason crash.Reason
		// crashed: counted as a crash; signal: the journal names it.
		crashed bool
		signal  string
		lastErr string
	}{
		{name: "a crash the shim reports alone", steps: []step{shim(exitStatus(3))},
			state: Backoff, reason: crash.ExitCode, crashed: true, lastErr: "exited with status 3"},
		{name: "SIGKILL of the engine, systemd silent: the shim's word after the hold",
			steps: []step{shim(killedBy(syscall.SIGKILL)), hold}, state: Backoff, reason: crash.Signal, crashed: true, signal: "SIGKILL"},
		{name: "systemctl stop: the shim first, then systemd names the operator",
			steps: []step{shim(killedBy(syscall.SIGTERM)), systemd(witness.Dead, witness.OperatorStop)}, state: Stopped,
			lastErr: "stopped by an operator: systemctl stop pool-engine-p.scope"},
		{name: "systemctl stop: systemd first",
			steps: []step{systemd(witness.Stopping, witness.OperatorStop), shim(killedBy(syscall.SIGTERM)), systemd(witness.Dead, witness.OperatorStop)},
			state: Stopped, lastErr: "stopped by an operator"},
		{name: "systemctl kill of the whole scope: the shim lost, reaped by SIGKILL",
			steps: []step{shim(Exit{Lost: true, LostWhy: "the shim ended without reporting the engine's exit", ShimSignal: syscall.SIGKILL}), systemd(witness.Dead, witness.Emptied)},
			state: Backoff, reason: crash.Signal, crashed: true, signal: "SIGKILL", lastErr: "whole scope was killed"},
		{name: "the shim OOM-killed after the engine: lost, with the scope's OOM kill read from outside",
			steps: []step{shim(Exit{Lost: true, LostWhy: "the shim ended without reporting the engine's exit", ShimSignal: syscall.SIGKILL, OOMKills: 1}), systemd(witness.Dead, witness.Emptied)},
			state: Backoff, reason: crash.OutOfMemory, crashed: true, signal: "SIGKILL", lastErr: "out of memory: the engine's whole scope was killed (its shim too, by SIGKILL), 1 OOM kill(s) in the scope"},
		{name: "Result=oom-kill after the shim's SIGKILL",
			steps: []step{shim(killedBy(syscall.SIGKILL)), systemd(witness.Dead, witness.OOMKilled)},
			state: Backoff, reason: crash.OutOfMemory, crashed: true, signal: "SIGKILL", lastErr: "Result=oom-kill"},
		{name: "Result=oom-kill before the shim's report",
			steps: []step{systemd(witness.Dead, witness.OOMKilled), shim(killedBy(syscall.SIGKILL))},
			state: Backoff, reason: crash.OutOfMemory, crashed: true, signal: "SIGKILL", lastErr: "Result=oom-kill"},
		{name: "the scope vanished and the shim never reported",
			steps: []step{systemd(witness.Removed, witness.Vanished), hold},
			state: Backoff, reason: crash.Signal, crashed: true, lastErr: "scope vanished"},
		{name: "the shim reports after systemd, before the hold ends",
			steps: []step{systemd(witness.Dead, witness.Emptied), shim(exitStatus(9))},
			state: Backoff, reason: crash.ExitCode, crashed: true, lastErr: "exited with status 9"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newPool(t, nil)
			run := p.ready()
			p.step(unit(witness.Started, witness.NoCause))
			var acts []Action
			for _, s := range tc.steps {
				s(p, run)
				acts = append(acts, p.last...)
			}
			// Anything either witness says later changes nothing.
			p.step(unit(witness.Removed, witness.Vanished))
			acts = append(acts, p.last...)
			if _, armed := p.timers[TimerHoldExit]; armed {
				acts = append(acts, p.fire(TimerHoldExit)...)
			}
			p.exit(run, killedBy(syscall.SIGKILL))
			acts = append(acts, p.last...)

			v := p.m.View(p.now)
			assert.Equal(t, tc.state, v.State)
			assert.Contains(t, v.LastError, tc.lastErr)
			entries := crashEntries(acts)
			if !tc.crashed {
				assert.Zero(t, v.Policy.CrashCount, "no crash counted")
				assert.Empty(t, entries)
				assert.NotContains(t, p.timers, TimerRestart, "not restarted")
				return
			}
			assert.Equal(t, uint64(1), v.Policy.CrashCount, "counted exactly once")
			require.Len(t, entries, 1, "one crash entry")
			e := entries[0]
			assert.Equal(t, tc.reason, e.Reason)
			assert.Equal(t, tc.reason, v.LastReason)
			assert.Equal(t, tc.signal, e.ExitSignal)
			assert.Equal(t, v.LastError, e.Detail)
			assert.Contains(t, p.timers, TimerRestart, "restarted after its backoff")
		})
	}
}

// A scope keeps its name across starts: a late word on the scope of an
// engine that is gone does not end the one running now, even when that
// scope's Started comes after the new engine's start.
func TestALateWordOnAnEarlierScopeIsNotAboutTheEngineRunningNow(t *testing.T) {
	p := newPool(t, nil)
	run := p.ready()
	p.step(UnitChanged{Event: witness.Event{Kind: witness.Started, Invocation: "inv-before"}})
	for _, c := range []witness.Cause{witness.OurStop, witness.Emptied, witness.Vanished, witness.OperatorStop} {
		p.step(UnitChanged{Event: witness.Event{Kind: witness.Dead, Cause: c, Invocation: "inv-before"}})
		p.step(UnitChanged{Event: witness.Event{Kind: witness.Removed, Cause: c, Invocation: "inv-before"}})
	}
	p.step(unit(witness.Dead, witness.OurStop))
	assert.NotContains(t, p.timers, TimerHoldExit)
	v := p.m.View(p.now)
	assert.Equal(t, Ready, v.State)
	assert.True(t, v.Ready)
	p.step(Probed{Run: run})
	_, beat := find[Heartbeat](p.last)
	assert.True(t, beat, "still watched")
}

// The crash entry is written once, by the policy's Crashed, with what the
// pool knows; no other entry repeats it.
func TestTheCrashEntryHasOneRenderer(t *testing.T) {
	p := newPool(t, func(c *Config) { c.DeviceMask = "0"; c.EngineVersion = "b4000" })
	run := p.ready()
	p.advance(90 * time.Second)
	acts := p.exit(run, Exit{Status: syscall.WaitStatus(syscall.SIGKILL), OOMKills: 1})
	entries := crashEntries(acts)
	require.Len(t, entries, 1)
	e := entries[0]
	assert.Equal(t, journal.MsgOOM, e.MessageID(), "an OOM kill has its own MESSAGE_ID")
	assert.Equal(t, journal.LevelCritical, e.Level())
	assert.Equal(t, "engine crashed: "+e.Detail, e.Message())
	assert.Equal(t, 90*time.Second, e.Uptime)
	attrs := map[string]string{}
	for _, a := range e.Attrs() {
		attrs[a.Key] = a.Value.String()
	}
	assert.Equal(t, map[string]string{
		journal.CrashReason: "out_of_memory", journal.CrashCount: "1", journal.RestartCount: "0", journal.FailureStreak: "1",
		journal.EngineVersion: "b4000", journal.Model: "m.gguf", journal.DeviceMask: "0", journal.ExitSignal: "SIGKILL",
		journal.UptimeSec: "90",
	}, attrs)
	for _, l := range all[Log](acts) {
		assert.NotContains(t, l.Msg, "crashed", "the crash is journaled once")
	}
}

func TestHealthFailuresStopTheEngineAtTheThreshold(t *testing.T) {
	p := newPool(t, nil)
	run := p.ready()
	for i := 1; i <= 3; i++ {
		p.advance(time.Second)
		p.step(Probed{Run: run, Err: assert.AnError})
		_, stopping := find[StopScope](p.last)
		assert.Equal(t, i == 3, stopping, "probe %d", i)
		assert.Len(t, p.m.View(p.now).HealthFailures, i)
	}
	assert.False(t, p.m.View(p.now).Ready, "not ready while it is stopped")
	// Probes of a stopping engine are not counted again.
	p.step(Probed{Run: run, Err: assert.AnError})
	assert.Len(t, p.m.View(p.now).HealthFailures, 3)
	p.exit(run, killedBy(syscall.SIGTERM))
	v := p.m.View(p.now)
	assert.Equal(t, crash.HealthCheck, v.LastReason)
	assert.Equal(t, Backoff, v.State)
}

func TestAGoodProbeIsAQuietHeartbeat(t *testing.T) {
	p := newPool(t, nil)
	run := p.ready()
	p.advance(time.Second)
	acts := p.step(Probed{Run: run})
	_, published := find[Publish](acts)
	assert.False(t, published, "a heartbeat wakes nobody")
	hb, ok := find[Heartbeat](acts)
	require.True(t, ok)
	assert.Equal(t, p.now, hb.At)
}

func TestWarmingComesBetweenHealthyAndReady(t *testing.T) {
	p := newPool(t, func(c *Config) { c.Warmup = true })
	req := p.request(func(id ReqID) Event { return StartRequested{Req: id} })
	run := p.launchStaged(staged("m.gguf", "sha256:a"), 100)
	require.NoError(t, p.reply(req).Err)
	p.step(Healthy{Run: run})
	_, warming := find[Warmup](p.last)
	assert.True(t, warming)
	assert.Equal(t, Warming, p.m.State())
	assert.False(t, p.m.View(p.now).Ready)
	_, err := p.lease("early")
	assert.ErrorIs(t, err, ErrNotReady)
	p.step(WarmedUp{Run: run})
	assert.Equal(t, Ready, p.m.State())
	assert.True(t, p.m.View(p.now).Ready)
}

func TestAHeldPoolStartsOnlyAfterResetBreaker(t *testing.T) {
	m := New(Config{Pool: "p", Model: "m.gguf", FailureThreshold: 3}, policy.New(policy.Defaults(), func() float64 { return 0.5 }), "persisted state unreadable")
	p := &pool{t: t, m: m, now: t0, timers: map[Timer]ArmTimer{}}
	assert.Equal(t, Failed, m.State())
	assert.ErrorIs(t, p.reply(p.request(func(id ReqID) Event { return StartRequested{Req: id} })).Err, ErrBreakerOpen)
	p.step(ResetBreakerRequested{})
	assert.Equal(t, Stopped, m.State())
	p.request(func(id ReqID) Event { return StartRequested{Req: id} })
	_, staging := find[Stage](p.last)
	assert.True(t, staging)
}

func TestAStartCalledOffWhileStagingAnswersBusy(t *testing.T) {
	p := newPool(t, nil)
	start := p.request(func(id ReqID) Event { return StartRequested{Req: id} })
	stage, _ := find[Stage](p.last)
	drain := p.request(func(id ReqID) Event { return DrainRequested{Req: id} })
	assert.ErrorIs(t, p.reply(start).Err, ErrBusy)
	assert.Equal(t, Drained, p.reply(drain).Drain.Outcome)
	p.step(ModelStaged{Run: stage.Run, Staged: staged("m.gguf", "sha256:a")})
	_, launched := find[Launch](p.last)
	assert.False(t, launched, "a called-off start does not launch")
	assert.Equal(t, Stopped, p.m.State())
}

func TestARestartThatCannotStartIsACrash(t *testing.T) {
	p := newPool(t, nil)
	run := p.ready()
	p.exit(run, exitStatus(1))
	p.fire(TimerRestart)
	stage, ok := find[Stage](p.last)
	require.True(t, ok)
	p.step(ModelStaged{Run: stage.Run, Staged: staged("m.gguf", "sha256:a")})
	launch, _ := find[Launch](p.last)
	p.step(StartFailed{Run: launch.Run, Err: assert.AnError})
	v := p.m.View(p.now)
	assert.Equal(t, uint64(2), v.Policy.CrashCount)
	assert.Equal(t, crash.StartFailure, v.LastReason)
	assert.Equal(t, Backoff, v.State)
}

// The backoff runs from the engine's exit: an exit held for systemd's word
// restarts as long after the exit as the backoff says, not after the word.
func TestTheBackoffRunsFromTheExitNotFromSystemdsWord(t *testing.T) {
	p := newPool(t, nil)
	run := p.ready()
	exitAt := p.now
	p.exit(run, killedBy(syscall.SIGKILL))
	require.Contains(t, p.timers, TimerHoldExit, "a SIGKILL waits for systemd's word")
	p.advance(40 * time.Millisecond)
	p.step(unit(witness.Dead, witness.NoCause))
	require.Equal(t, Backoff, p.m.State())
	restart, ok := p.timers[TimerRestart]
	require.True(t, ok, "a restart is scheduled")
	var sched policy.RestartScheduled
	for _, j := range all[Journal](p.last) {
		for _, ev := range j.Events {
			if e, ok := ev.(policy.RestartScheduled); ok {
				sched = e
			}
		}
	}
	require.NotZero(t, sched.Delay, "the restart is journaled")
	assert.Equal(t, exitAt.Add(sched.Delay), restart.At, "delay after the exit")
	assert.Equal(t, restart.At, sched.At, "the journal says when")
	assert.Equal(t, restart.At, p.m.View(p.now).NextRestart, "and so does the bus")
}

// The kernel's word that the engine ended takes Ready away at once; how it
// ended waits for the shim's report, and a word on an earlier run changes
// nothing.
func TestDiedTakesReadyAwayBeforeTheExitIsKnown(t *testing.T) {
	p := newPool(t, nil)
	run := p.ready()
	p.step(Died{Run: run + 7})
	require.True(t, p.m.View(p.now).Ready, "another run's")
	p.step(Died{Run: run})
	v := p.m.View(p.now)
	assert.False(t, v.Ready)
	assert.True(t, v.Live, "the exit is not known yet")
	pub, ok := find[Publish](p.last)
	require.True(t, ok, "published at once")
	assert.False(t, pub.View.Ready)
	_, err := p.lease("router")
	assert.ErrorIs(t, err, ErrNotReady)
	p.exit(run, killedBy(syscall.SIGSEGV))
	assert.Equal(t, Backoff, p.m.State())
	assert.Len(t, crashEntries(p.last), 1, "counted once, from the shim's report")
}

// A stop the daemon began (failed probes, a stall, a drain) that ends in
// systemd's SIGKILL of the whole scope is the stop, not a lost shim: the
// crash keeps the stop's reason and the journal says the stop escalated.
// llama-server with a request in flight ignores SIGTERM; a frozen engine
// cannot act on it.
func TestAStopThatEscalatesToSIGKILLKeepsItsReason(t *testing.T) {
	scopeKilled := Exit{Lost: true, LostWhy: "the shim ended without reporting the engine's exit", ShimSignal: syscall.SIGKILL}
	for _, tc := range []struct {
		name   string
		stop   func(p *pool, run RunID)
		reason crash.Reason
		state  State
	}{
		{name: "failed probes", reason: crash.HealthCheck, state: Backoff, stop: func(p *pool, run RunID) {
			for range 3 {
				p.advance(time.Second)
				p.step(Probed{Run: run, Err: assert.AnError})
			}
		}},
		{name: "a stall", reason: crash.Stalled, state: Backoff, stop: func(p *pool, run RunID) {
			p.step(Progress{Run: run, InFlight: 1, Tokens: 5})
			p.advance(2 * time.Minute)
			p.step(Progress{Run: run, InFlight: 1, Tokens: 5})
		}},
		{name: "a drain", state: Stopped, stop: func(p *pool, run RunID) {
			p.request(func(id ReqID) Event { return DrainRequested{Req: id} })
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newPool(t, func(c *Config) { c.Stall = time.Minute })
			run := p.ready()
			tc.stop(p, run)
			p.must(p.last, "the stop")
			_, stopping := find[StopScope](p.last)
			require.True(t, stopping, "the daemon stops the engine")
			acts := p.exit(run, scopeKilled)
			for _, l := range all[Log](acts) {
				assert.NotContains(t, l.Msg, "shim lost")
			}
			_, again := find[StopScope](acts)
			assert.False(t, again, "the scope is already going")
			var said bool
			for _, l := range all[Log](acts) {
				if l.Msg == "engine did not exit on SIGTERM within its stop timeout: its scope was killed with SIGKILL" {
					said = true
				}
			}
			assert.True(t, said, "the escalation is journaled")
			v := p.m.View(p.now)
			assert.Equal(t, tc.state, v.State)
			crashes := crashEntries(acts)
			if tc.reason == "" {
				assert.Empty(t, crashes, "a drain's stop is no crash")
				return
			}
			require.Len(t, crashes, 1)
			assert.Equal(t, tc.reason, crashes[0].Reason)
			assert.Equal(t, tc.reason, v.LastReason)
			assert.Contains(t, v.LastError, "did not exit on SIGTERM within its stop timeout")
		})
	}
}

// The same SIGKILL of the whole scope without a stop of the daemon's is
// someone else's kill: a crash naming the signal, and the scope goes.
func TestAScopeKilledWhileNotStoppingIsStillASignal(t *testing.T) {
	p := newPool(t, nil)
	run := p.ready()
	acts := p.exit(run, Exit{Lost: true, LostWhy: "the shim ended without reporting the engine's exit", ShimSignal: syscall.SIGKILL})
	p.fire(TimerHoldExit)
	_, stops := find[StopScope](acts)
	assert.True(t, stops)
	assert.Equal(t, crash.Signal, p.m.View(p.now).LastReason)
}

// A GPU fault line in an engine's output may be a client's text it echoed:
// the engine's death (classified by the line) or a failed probe confirms
// it; an engine that goes on serving is left alone. XIDs, the kernel's
// word, stop it at once.
func TestAFaultLineOfAServingEngineNeedsConfirming(t *testing.T) {
	const line = "CUDA error: an illegal memory access was encountered"
	t.Run("it dies: cuda_error", func(t *testing.T) {
		p := newPool(t, nil)
		run := p.ready()
		p.step(Faulted{Run: run, What: line})
		_, stopping := find[StopScope](p.last)
		assert.False(t, stopping, "a line alone stops no serving engine")
		p.exit(run, killedBy(syscall.SIGABRT))
		v := p.m.View(p.now)
		assert.Equal(t, crash.CUDAError, v.LastReason)
		assert.Contains(t, v.LastError, line)
	})
	t.Run("a failed probe confirms it", func(t *testing.T) {
		p := newPool(t, nil)
		run := p.ready()
		p.step(Faulted{Run: run, What: line})
		p.advance(time.Second)
		p.step(Probed{Run: run, Err: assert.AnError})
		_, stopping := find[StopScope](p.last)
		assert.True(t, stopping, "stopped at the first failed probe, not the threshold")
		p.exit(run, killedBy(syscall.SIGTERM))
		assert.Equal(t, crash.CUDAError, p.m.View(p.now).LastReason)
	})
	t.Run("it goes on serving: text, not a fault", func(t *testing.T) {
		p := newPool(t, nil)
		run := p.ready()
		p.step(Faulted{Run: run, What: line})
		p.advance(time.Second)
		p.step(Probed{Run: run})
		acts := p.fire(TimerFault)
		_, stopping := find[StopScope](acts)
		assert.False(t, stopping)
		require.Len(t, all[Log](acts), 1)
		assert.Contains(t, all[Log](acts)[0].Msg, "not acted on")
		assert.True(t, p.m.View(p.now).Ready)
		// A later crash is not blamed on the line.
		p.exit(run, killedBy(syscall.SIGSEGV))
		assert.Equal(t, crash.Signal, p.m.View(p.now).LastReason)
	})
	t.Run("before it serves, the same: its death classifies it", func(t *testing.T) {
		p := newPool(t, nil)
		p.request(func(id ReqID) Event { return StartRequested{Req: id} })
		run := p.launchStaged(staged("m.gguf", "sha256:a"), 100)
		p.step(Faulted{Run: run, What: line})
		_, stopping := find[StopScope](p.last)
		assert.False(t, stopping, "a line alone stops no engine")
		p.exit(run, killedBy(syscall.SIGABRT))
		assert.Equal(t, crash.CUDAError, p.m.View(p.now).LastReason)
	})
	t.Run("an XID stops a serving engine at once", func(t *testing.T) {
		p := newPool(t, nil)
		p.ready()
		p.step(Faulted{What: "NVML: Xid 79 on GPU-0", XID: true, Code: 79, GPU: "GPU-0"})
		_, stopping := find[StopScope](p.last)
		assert.True(t, stopping)
	})
}

// Start of a pool on its way up or up already succeeds and changes
// nothing, as systemctl start of an active unit does.
func TestAStartOfAStartingOrReadyPoolChangesNothing(t *testing.T) {
	p := newPool(t, func(c *Config) { c.Warmup = true })
	again := func(state State) {
		t.Helper()
		before := p.m.View(p.now)
		req := p.request(func(id ReqID) Event { return StartRequested{Req: id} })
		require.NoError(t, p.reply(req).Err, "a start of a %s pool", state)
		for _, a := range p.last {
			switch a.(type) {
			case Reply, Publish:
			default:
				t.Errorf("a start of a %s pool did %T", state, a)
			}
		}
		assert.Equal(t, state, p.m.State())
		assert.Equal(t, before, p.m.View(p.now))
	}
	first := p.request(func(id ReqID) Event { return StartRequested{Req: id} })
	stage, ok := find[Stage](p.last)
	require.True(t, ok)
	again(Starting)
	p.step(ModelStaged{Run: stage.Run, Staged: staged("m.gguf", "sha256:a")})
	launch, ok := find[Launch](p.last)
	require.True(t, ok, "the first start goes on")
	p.step(EngineStarted{Run: launch.Run, PID: 100, Invocation: "inv-now"})
	require.NoError(t, p.reply(first).Err)
	again(Starting)
	p.step(Healthy{Run: launch.Run})
	require.Equal(t, Warming, p.m.State())
	again(Warming)
	p.step(WarmedUp{Run: launch.Run})
	require.Equal(t, Ready, p.m.State())
	again(Ready)

	// A drain under way is no start's to undo.
	p.request(func(id ReqID) Event { return DrainRequested{Req: id, Deadline: time.Minute} })
	_, err := p.lease("late")
	require.Error(t, err)
	assert.ErrorIs(t, p.reply(p.request(func(id ReqID) Event { return StartRequested{Req: id} })).Err, ErrBusy)
}
