package lifecycle

import (
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/model"
	"github.com/llorch/pool-managerd/internal/policy"
)

// pool drives a Machine on a simulated clock, carrying out nothing: the
// tests read the actions.
type pool struct {
	t   *testing.T
	m   *Machine
	now time.Time
	req ReqID
	// last holds the actions of the latest step.
	last []Action
	// timers are the armed timers (their ArmTimer).
	timers map[Timer]ArmTimer
}

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func newPool(t *testing.T, mod func(*Config)) *pool {
	cfg := Config{Pool: "p", Unit: "pool-engine-p.scope", Model: "m.gguf", FailureThreshold: 3, Witness: true, HoldExit: 500 * time.Millisecond}
	if mod != nil {
		mod(&cfg)
	}
	p := &pool{t: t, now: t0, timers: map[Timer]ArmTimer{}}
	p.m = New(cfg, policy.New(policy.Defaults(), func() float64 { return 0.5 }), "")
	p.track(p.m.Init(p.now))
	return p
}

func (p *pool) track(acts []Action) []Action {
	p.last = acts
	for _, a := range acts {
		switch a := a.(type) {
		case ArmTimer:
			p.timers[a.Timer] = a
		case CancelTimer:
			delete(p.timers, a.Timer)
		}
	}
	return acts
}

func (p *pool) step(ev Event) []Action { return p.track(p.m.Step(p.now, ev)) }

// request steps the event mk makes for a new request id and returns the id.
func (p *pool) request(mk func(ReqID) Event) ReqID {
	p.req++
	p.step(mk(p.req))
	return p.req
}

func (p *pool) advance(d time.Duration) { p.now = p.now.Add(d) }

// fire advances to timer t and fires it.
func (p *pool) fire(t Timer) []Action {
	a, ok := p.timers[t]
	require.True(p.t, ok, "timer %d is not armed", t)
	if a.At.After(p.now) {
		p.now = a.At
	}
	delete(p.timers, t)
	return p.step(TimerFired{Timer: t, Gen: a.Gen})
}

func find[T Action](acts []Action) (T, bool) {
	for _, a := range acts {
		if v, ok := a.(T); ok {
			return v, true
		}
	}
	var zero T
	return zero, false
}

func all[T Action](acts []Action) []T {
	var out []T
	for _, a := range acts {
		if v, ok := a.(T); ok {
			out = append(out, v)
		}
	}
	return out
}

func (p *pool) must(acts []Action, what string) {
	p.t.Helper()
	require.NotEmpty(p.t, acts, what)
}

// reply returns the reply to req among the last actions.
func (p *pool) reply(req ReqID) Reply {
	p.t.Helper()
	for _, r := range all[Reply](p.last) {
		if r.Req == req {
			return r
		}
	}
	p.t.Fatalf("no reply to request %d in %v", req, p.last)
	return Reply{}
}

func (p *pool) noReply(req ReqID) {
	p.t.Helper()
	for _, r := range all[Reply](p.last) {
		require.NotEqual(p.t, req, r.Req, "request %d answered too soon: %+v", req, r)
	}
}

func staged(ref, digest string) model.Staged {
	s := model.Staged{Digest: digest, Path: "/staged/" + digest}
	s.Ref = ref
	return s
}

// launchStaged answers the pending Stage with a staged model and the
// Launch with a process; it returns the run.
func (p *pool) launchStaged(st model.Staged, pid int) RunID {
	p.t.Helper()
	stage, ok := find[Stage](p.last)
	require.True(p.t, ok, "a Stage is out: %v", p.last)
	p.step(ModelStaged{Run: stage.Run, Staged: st})
	launch, ok := find[Launch](p.last)
	require.True(p.t, ok, "a Launch follows the staging: %v", p.last)
	p.step(EngineStarted{Run: launch.Run, PID: pid, Invocation: "inv-now"})
	_, ok = find[Watch](p.last)
	require.True(p.t, ok, "the new engine is watched")
	return launch.Run
}

// ready starts the pool and brings its engine to Ready.
func (p *pool) ready() RunID {
	p.t.Helper()
	req := p.request(func(id ReqID) Event { return StartRequested{Req: id} })
	run := p.launchStaged(staged("m.gguf", "sha256:a"), 100)
	require.NoError(p.t, p.reply(req).Err)
	p.step(Healthy{Run: run})
	require.Equal(p.t, Ready, p.m.State())
	require.True(p.t, p.m.View(p.now).Ready)
	return run
}

func (p *pool) lease(owner string) (string, error) {
	id := "p/" + owner + time.Duration(p.req).String()
	req := p.request(func(r ReqID) Event { return LeaseRequested{Req: r, ID: id, Owner: owner} })
	rep := p.reply(req)
	return rep.Lease, rep.Err
}

func exitStatus(code int) Exit {
	return Exit{Status: syscall.WaitStatus(code << 8), At: t0}
}

func killedBy(sig syscall.Signal) Exit {
	return Exit{Status: syscall.WaitStatus(sig), At: t0}
}

// exit reports run's exit now; a stop of its scope that is out ends
// first (systemd's job may end before the shim's report reaches the
// loop; TestStopAnswersOnceTheScopeIsGone takes the other order).
func (p *pool) exit(run RunID, x Exit) []Action {
	x.At = p.now
	if p.m.scopeStops[run] {
		p.step(ScopeStopped{Run: run})
	}
	return p.step(Exited{Run: run, Exit: x})
}
