package lifecycle

import (
	"errors"
	"fmt"
	"syscall"
	"time"

	"github.com/llorch/pool-managerd/internal/crash"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/model"
	"github.com/llorch/pool-managerd/internal/policy"
)

// Sim runs a Machine on a simulated clock with engines that do as they
// are told and a staging that always works: what --print-schedule shows
// is what the daemon's own machine decides.
type Sim struct {
	M   *Machine
	Now time.Time
	// Journal collects the events journaled since the last Take.
	Journal []journal.Event
	timers  map[Timer]ArmTimer
	run     RunID
	pid     int
	steps   Queue
	// replied is the error of the last reply.
	replied error
}

// NewSim returns a stopped pool at now.
func NewSim(cfg Config, tr *policy.Tracker, now time.Time) *Sim {
	s := &Sim{M: New(cfg, tr, ""), Now: now, timers: map[Timer]ArmTimer{}, pid: 1000}
	s.do(s.M.Init(now))
	return s
}

// step feeds ev; what the engines report meanwhile waits until the step's
// actions are done, as in the supervisor.
func (s *Sim) step(ev Event) {
	s.steps.Feed(ev, func(ev Event) { s.do(s.M.Step(s.Now, ev)) })
}

func (s *Sim) do(acts []Action) {
	for _, a := range acts {
		switch a := a.(type) {
		case Stage:
			st := model.Staged{Digest: "sha256:sim", Path: "/sim/" + a.Ref}
			st.Ref = a.Ref
			s.step(ModelStaged{Run: a.Run, Staged: st})
		case Launch:
			s.pid++
			s.run = a.Run
			s.step(EngineStarted{Run: a.Run, PID: s.pid})
		case StopScope:
			if s.M.run != nil && s.M.run.id == a.Run {
				s.step(Exited{Run: a.Run, Exit: Exit{Status: syscall.WaitStatus(syscall.SIGTERM), At: s.Now}})
			}
			s.step(ScopeStopped{Run: a.Run})
		case ArmTimer:
			s.timers[a.Timer] = a
		case CancelTimer:
			delete(s.timers, a.Timer)
		case Journal:
			s.Journal = append(s.Journal, a.Events...)
		case Reply:
			s.replied = a.Err
		case Warmup:
			s.step(WarmedUp{Run: a.Run})
		}
	}
}

// Take returns the journaled events and forgets them.
func (s *Sim) Take() []journal.Event {
	ev := s.Journal
	s.Journal = nil
	return ev
}

// Start starts the engine and makes it healthy.
func (s *Sim) Start() error {
	s.replied = nil
	s.step(StartRequested{Req: 1})
	if s.replied != nil {
		return s.replied
	}
	return s.healthy()
}

func (s *Sim) healthy() error {
	if s.M.run == nil {
		return errors.New("no engine runs")
	}
	s.step(Healthy{Run: s.run})
	return nil
}

// Crash makes the running engine fail the way that is classified as
// reason.
func (s *Sim) Crash(reason crash.Reason) error {
	r := s.M.run
	if r == nil {
		return errors.New("no engine runs")
	}
	exit := func(st syscall.WaitStatus, oom uint64) {
		s.step(Exited{Run: r.id, Exit: Exit{Status: st, OOMKills: oom, At: s.Now}})
	}
	switch reason {
	case crash.ExitCode:
		exit(1<<8, 0)
	case crash.Signal:
		exit(syscall.WaitStatus(syscall.SIGSEGV), 0)
	case crash.CoreDump:
		exit(syscall.WaitStatus(syscall.SIGSEGV)|0x80, 0)
	case crash.OutOfMemory:
		exit(syscall.WaitStatus(syscall.SIGKILL), 1)
	case crash.HealthCheck:
		for range max(s.M.cfg.FailureThreshold, 1) {
			s.step(Probed{Run: r.id, Err: errors.New("connection refused")})
		}
	case crash.Stalled:
		if s.M.cfg.Stall <= 0 {
			return errors.New("the pool does not watch for stalls (StallSec=)")
		}
		s.step(Progress{Run: r.id, InFlight: 1, Tokens: 7})
		s.Now = s.Now.Add(s.M.cfg.Stall)
		s.step(Progress{Run: r.id, InFlight: 1, Tokens: 7})
	case crash.CUDAError:
		s.step(Faulted{Run: r.id, What: "CUDA error: an illegal memory access was encountered"})
	case crash.DriverXID:
		s.step(Faulted{What: "NVML: Xid 79 on GPU-0", XID: true, Code: 79, GPU: "GPU-0"})
	case crash.StartFailure:
		s.step(StartTimedOut{Run: r.id, Err: errors.New("not healthy within StartTimeoutSec")})
	default:
		return fmt.Errorf("crash reason %s is not simulated", reason)
	}
	return nil
}

// Restart moves the clock to the pending restart (or retry) and lets it
// happen; started says whether an engine runs (healthy) after it.
func (s *Sim) Restart() (started bool, err error) {
	t, ok := s.timers[TimerRestart]
	if !ok {
		return false, errors.New("no restart is scheduled")
	}
	s.Advance(t.At.Sub(s.Now))
	if s.M.run == nil {
		return false, nil
	}
	return true, s.healthy()
}

// Advance moves the clock by d, firing the timers due on the way.
func (s *Sim) Advance(d time.Duration) {
	end := s.Now.Add(d)
	for {
		var next *ArmTimer
		for _, a := range s.timers {
			if !a.At.After(end) && (next == nil || a.At.Before(next.At)) {
				next = &a
			}
		}
		if next == nil {
			break
		}
		delete(s.timers, next.Timer)
		if next.At.After(s.Now) {
			s.Now = next.At
		}
		s.step(TimerFired{Timer: next.Timer, Gen: next.Gen})
	}
	s.Now = end
}
