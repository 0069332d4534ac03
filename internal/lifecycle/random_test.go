package lifecycle

import (
	"errors"
	"fmt"
	"maps"
	"math/rand"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/llorch/pool-managerd/internal/policy"
	"github.com/llorch/pool-managerd/internal/witness"
)

// choices reads a fuzz input as a stream of choices; it is over when
// the input is.
type choices struct{ b []byte }

func (c *choices) over() bool { return len(c.b) == 0 }

// n returns a choice in [0, k).
func (c *choices) n(k int) int {
	if len(c.b) == 0 {
		return 0
	}
	v := int(c.b[0])
	c.b = c.b[1:]
	return v % k
}

func (c *choices) yes() bool { return c.n(2) == 0 }

// engineRun is what the machine's actions told of one engine run, so
// that its events come as the supervisor sends them: one healthy word or
// start timeout, probes after it, one death and one exit per process.
type engineRun struct {
	started, healthy, timedOut, died, exited, probesOff bool
	warmups, sleeps, wakes                              int
}

// drive steps a machine with events chosen by c, as the supervisor, its
// engines, systemd, the timers and callers may send them: replies to its
// actions in any order, late words on earlier runs, requests at any
// time. Any move a table lacks panics (strictTransitions).
func drive(c *choices) map[State]bool {
	now := t0
	cfg := Config{Pool: "p", Unit: "u.scope", Model: "m", FailureThreshold: 1 + c.n(2),
		Witness: c.n(3) > 0, HoldExit: 500 * time.Millisecond, Warmup: c.yes()}
	if c.yes() {
		cfg.Stall = 10 * time.Second
	}
	cfg.DrainRequests = c.yes()
	if c.yes() {
		cfg.Ahead = 2 * time.Second
	}
	if c.n(3) == 0 {
		cfg.Slots = 2
	}
	if c.n(4) == 0 {
		cfg.ModelDigest = "sha256:m"
	}
	if c.yes() {
		cfg.IdleStop = 3 * time.Second
		cfg.StartOnLease = c.yes()
		cfg.WakeTimeout = time.Duration(1+c.n(3)) * 5 * time.Second
		cfg.Sleep, cfg.SleepLevel = c.yes(), 1+c.n(2)
	}
	held := ""
	if c.n(10) == 0 {
		held = "unreadable"
	}
	pp := policy.Defaults()
	if c.yes() {
		pp.Breaker.Threshold, pp.Breaker.Open, pp.Breaker.Stable = 2, 3*time.Second, 2*time.Second
		pp.Storm.Max, pp.Storm.Window = 2, 20*time.Second
	}
	m := New(cfg, policy.New(pp, func() float64 { return 0.5 }), held)

	stages := map[RunID]string{}
	var launches, runs []RunID
	engines := map[RunID]*engineRun{}
	eng := func(r RunID) *engineRun {
		if engines[r] == nil {
			engines[r] = &engineRun{}
		}
		return engines[r]
	}
	timers := map[Timer]ArmTimer{}
	// stops: scopes whose stop is out (StopScope), in order.
	var stops []RunID
	prepared, prepInv, preps := false, "", 0
	var req ReqID
	pid := 100
	track := func(acts []Action) {
		for _, a := range acts {
			switch a := a.(type) {
			case Stage:
				stages[a.Run] = a.Ref
				runs = append(runs, a.Run)
			case Launch:
				launches = append(launches, a.Run)
			case Watch:
				eng(a.Run).started = true
			case Warmup:
				eng(a.Run).warmups++
			case Sleep:
				eng(a.Run).sleeps++
			case Wake:
				eng(a.Run).wakes++
			case StopProbes:
				eng(a.Run).probesOff = true
			case StopScope:
				stops = append(stops, a.Run)
			case ArmTimer:
				timers[a.Timer] = a
			case CancelTimer:
				delete(timers, a.Timer)
			case Prepare:
				prepared = true
			case Unprepare:
				prepared = false
			}
		}
	}
	seen := map[State]bool{}
	step := func(ev Event) {
		track(m.Step(now, ev))
		seen[m.state] = true
	}
	track(m.Init(now))
	if c.n(4) == 0 {
		// A daemon's first step may adopt the engine a previous one left.
		r := m.NewRun()
		runs = append(runs, r)
		st := staged("m", "sha256:m")
		req++
		// Its record may say it was left asleep (a sleeping engine holds
		// no lease).
		asleep := c.n(3) == 0
		leases := map[string]string{"l1": "o1"}
		if asleep {
			leases = nil
		}
		step(Adopted{Req: req, Run: r, PID: pid, Started: now.Add(-time.Minute), Staged: st,
			Leases: leases, RecordHeld: len(leases), Starting: !asleep && c.yes(), Invocation: fmt.Sprint("inv", r),
			Asleep: asleep, AsleepSince: now.Add(-time.Minute), Parked: c.yes()})
	}
	// pick is mostly the latest run, sometimes an earlier one.
	pick := func() RunID {
		if len(runs) == 0 {
			return 0
		}
		if c.n(4) > 0 {
			return runs[len(runs)-1]
		}
		return runs[c.n(len(runs))]
	}
	// late: a word of a run whose probes were stopped may still be on
	// its way, rarely.
	late := func(e *engineRun) bool { return e.probesOff && c.n(10) > 0 }
	inv := func(r RunID) string { return fmt.Sprint("inv", r) }
	refs := []string{"m", "m2", "m3"}
	for !c.over() {
		var ev Event
		switch k := c.n(43); {
		case k < 4:
			if len(stages) == 0 {
				continue
			}
			rs := make([]RunID, 0, len(stages))
			for r := range stages {
				rs = append(rs, r)
			}
			slices.Sort(rs)
			r := rs[c.n(len(rs))]
			ref := stages[r]
			delete(stages, r)
			if c.n(8) == 0 {
				ev = ModelStaged{Run: r, Err: errors.New("stage failed")}
			} else {
				ev = ModelStaged{Run: r, Staged: staged(ref, "sha256:"+ref)}
			}
		case k < 6:
			if len(launches) == 0 {
				continue
			}
			i := c.n(len(launches))
			r := launches[i]
			launches = slices.Delete(launches, i, i+1)
			switch c.n(8) {
			case 0:
				ev = StartFailed{Run: r, Err: errors.New("launch failed")}
			case 1:
				ev = StartFailed{Run: r, Err: fmt.Errorf("held: %w", ErrGPUBusy)}
			case 2:
				ev = StartFailed{Run: r, Err: fmt.Errorf("no memory: %w", ErrNoGPUMemory)}
			default:
				pid++
				ev = EngineStarted{Run: r, PID: pid, Invocation: inv(r)}
			}
		case k < 9:
			r := pick()
			e := eng(r)
			if !e.started || e.healthy || e.timedOut || late(e) {
				continue
			}
			e.healthy = true
			ev = Healthy{Run: r}
		case k < 10:
			r := pick()
			e := eng(r)
			if e.warmups == 0 {
				continue
			}
			e.warmups--
			var err error
			if c.n(4) == 0 {
				err = errors.New("warm-up failed")
			}
			ev = WarmedUp{Run: r, Err: err}
		case k < 13:
			r := pick()
			e := eng(r)
			if !e.healthy || late(e) {
				continue
			}
			var err error
			if c.yes() {
				err = errors.New("refused")
			}
			if k < 12 {
				ev = Probed{Run: r, Err: err, Canary: k == 11}
			} else {
				ev = Progress{Run: r, InFlight: float64(c.n(2)), Tokens: float64(c.n(2)), Err: err, NoAnswer: c.yes()}
			}
		case k < 14:
			r := pick()
			e := eng(r)
			switch c.n(4) {
			case 0:
				if !e.started || e.healthy || e.timedOut || late(e) {
					continue
				}
				e.timedOut = true
				ev = StartTimedOut{Run: r, Err: errors.New("not healthy in time")}
			case 1:
				if !e.started || e.exited {
					continue
				}
				ev = Faulted{Run: r, What: "CUDA error"}
			case 2:
				ev = Faulted{What: "Xid 79", XID: true, Code: 79, GPU: "GPU-0"}
			default:
				if !e.started || late(e) {
					continue
				}
				ev = Squatted{Run: r, Msg: "port held"}
			}
		case k < 15:
			r := pick()
			e := eng(r)
			if !e.started || e.died || e.exited {
				continue
			}
			e.died = true
			ev = Died{Run: r}
		case k < 18:
			r := pick()
			e := eng(r)
			if !e.started || e.exited {
				continue
			}
			e.exited = true
			x := Exit{At: now.Add(-time.Duration(c.n(3)) * 100 * time.Millisecond)}
			switch c.n(8) {
			case 0:
			case 1:
				x.Status = 1 << 8
			case 2:
				x.Status = syscall.WaitStatus(syscall.SIGTERM)
			case 3:
				x.Status = syscall.WaitStatus(syscall.SIGKILL)
			case 4:
				x.Status, x.OOMKills = syscall.WaitStatus(syscall.SIGKILL), 1
			case 5:
				x.Lost, x.LostWhy = true, "garbled"
			case 6:
				x.Lost, x.LostWhy = true, Vanished
			default:
				x.Status = syscall.WaitStatus(syscall.SIGSEGV)
			}
			ev = Exited{Run: r, Exit: x}
		case k < 20:
			we := witness.Event{Unit: cfg.Unit, Kind: witness.Kind(1 + c.n(4)), Cause: witness.Cause(c.n(7))}
			switch c.n(4) {
			case 0:
			case 1:
				we.Invocation = prepInv
				if c.yes() {
					we.Cause = witness.OperatorStop
				}
			default:
				we.Invocation = inv(pick())
			}
			ev = UnitChanged{Event: we}
		case k < 21:
			if !prepared || prepInv != "" && c.yes() {
				continue
			}
			preps++
			prepInv = fmt.Sprint("prep", preps)
			ev = ScopePrepared{Invocation: prepInv}
		case k < 26:
			ts := make([]Timer, 0, len(timers))
			for t := range timers {
				ts = append(ts, t)
			}
			if len(ts) == 0 {
				continue
			}
			slices.Sort(ts)
			a := timers[ts[c.n(len(ts))]]
			delete(timers, a.Timer)
			now = later(now, a.At)
			gen := a.Gen
			if c.n(10) == 0 {
				gen-- // an earlier arming's firing
			}
			ev = TimerFired{Timer: a.Timer, Gen: gen}
		case k < 27:
			now = now.Add(time.Duration(c.n(256)) * 100 * time.Millisecond)
			continue
		case k < 29:
			req++
			ev = StartRequested{Req: req}
		case k < 30:
			req++
			if c.yes() {
				ev = DrainRequested{Req: req, Deadline: time.Duration(c.n(2)) * 5 * time.Second}
			} else {
				ev = ParkRequested{Req: req, Deadline: time.Duration(c.n(2)) * 5 * time.Second}
			}
		case k < 32:
			req++
			ref := refs[c.n(len(refs))]
			ev = ReloadRequested{Req: req, Ref: ref, Digest: "sha256:" + ref, Deadline: time.Duration(c.n(2)) * 5 * time.Second}
		case k < 33:
			req++
			if c.yes() {
				ev = ResetBreakerRequested{}
			} else {
				ev = AllowRestartRequested{Req: req}
			}
		case k < 35:
			req++
			ev = LeaseRequested{Req: req, ID: fmt.Sprint("l", c.n(3)), Owner: fmt.Sprint("o", c.n(2))}
		case k < 37:
			req++
			ev = LeaseReleased{Req: req, ID: fmt.Sprint("l", c.n(3)), Owner: fmt.Sprint("o", c.n(2)), CheckOwner: c.yes()}
		case k < 38:
			req++
			if c.yes() {
				ev = OwnerGone{Req: req, Owner: fmt.Sprint("o", c.n(2))}
			} else {
				ev = EnsureReadyRequested{Req: req, Timeout: time.Duration(c.n(3)) * 4 * time.Second}
			}
		case k < 39:
			switch c.n(5) {
			case 0:
				ev = GPUUnhealthy{GPU: "GPU-0", Why: "needs a reset"}
			case 1:
				ev = GPUUsable{GPU: "GPU-0"}
			case 2:
				ev = VersionKnown{Version: fmt.Sprint("v", c.n(3))}
			case 3:
				if c.yes() {
					ev = IdleRestored{Since: now.Add(-time.Second)}
				} else {
					ev = Hashing{Fraction: float64(c.n(5)) / 4, Done: c.n(3) == 0}
				}
			default:
				ev = StageProgress{Run: pick(), Fraction: float64(c.n(5)) / 4}
			}
		case k < 41:
			// The engine's answer to a Sleep or a Wake.
			r := pick()
			e := eng(r)
			var err error
			if c.n(4) == 0 {
				err = errors.New("refused")
			}
			switch {
			case e.sleeps > 0 && (e.wakes == 0 || c.yes()):
				e.sleeps--
				ev = Slept{Run: r, Err: err}
			case e.wakes > 0:
				e.wakes--
				ev = Woke{Run: r, Err: err}
			default:
				continue
			}
		case k < 42:
			// systemd ends a stop job, in any order, at times twice.
			if len(stops) == 0 {
				continue
			}
			i := c.n(len(stops))
			ev = ScopeStopped{Run: stops[i]}
			if c.n(8) > 0 {
				stops = slices.Delete(stops, i, i+1)
			}
		default:
			now = now.Add(time.Duration(c.n(50)) * 10 * time.Millisecond)
			continue
		}
		step(ev)
		// The pool says draining only while a drain is under way, and
		// throughout a drain of its own (a reload's drain outlasts the
		// state: the reload's new engine is starting).
		if m.state == Draining && m.drain == nil || m.drain != nil && m.drain.reload == nil && m.state != Draining {
			panic(fmt.Sprintf("state %s with drain %+v", m.state, m.drain))
		}
		// Idle has no engine but the one its idle stop ends, and
		// callers wait only while a start may still answer them.
		if m.state == Idle && m.run != nil && m.run.stopping != StopIdle {
			panic(fmt.Sprintf("idle with a serving engine %+v", m.run))
		}
		if (m.state == Sleeping || m.state == Waking) && (m.run == nil && m.pending == nil || m.run != nil && m.run.stopping == StopIdle) {
			panic(fmt.Sprintf("%s without an engine %+v", m.state, m.run))
		}
		if len(m.waiters) > 0 && !(m.state == Starting || m.state == Warming || m.state == Idle && m.run != nil ||
			(m.state == Sleeping || m.state == Waking) && m.run != nil) {
			panic(fmt.Sprintf("%d callers wait on a pool %s", len(m.waiters), m.state))
		}
	}
	return seen
}

func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// seedChoices is a seed input of n choices.
func seedChoices(seed int64, n int) []byte {
	b := make([]byte, n)
	rand.New(rand.NewSource(seed)).Read(b)
	return b
}

// Whatever the machine is told, in whatever order its world may tell
// it, its state and its operations' phases move only along their tables.
func TestRandomEventsMoveOnlyAlongTheTables(t *testing.T) {
	seeds := 300
	if testing.Short() {
		seeds = 30
	}
	seen := map[State]bool{}
	for seed := range int64(seeds) {
		maps.Copy(seen, drive(&choices{seedChoices(seed, 1200)}))
	}
	for _, st := range States() {
		// A short run is too short to reach them all.
		if !seen[st] && !testing.Short() {
			t.Errorf("the walk never reached %s", st)
		}
	}
}

func FuzzStepMovesOnlyAlongTheTables(f *testing.F) {
	for seed := range int64(8) {
		f.Add(seedChoices(seed, 1200))
	}
	f.Fuzz(func(t *testing.T, b []byte) { drive(&choices{b}) })
}
