// Package supervisor runs one pool: it carries out what the pool's
// lifecycle machine (internal/lifecycle) decides. The engine's shim, the
// health prober, systemd, timers, lease holders and operators report to
// its loop, which feeds each report to the machine and does the actions
// it returns: stage a model, start an engine, stop a scope, write a
// record, arm a timer, answer a caller, publish the state, log.
package supervisor

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net/url"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/llorch/pool-managerd/internal/check"
	"github.com/llorch/pool-managerd/internal/check/progress"
	"github.com/llorch/pool-managerd/internal/check/sleep"
	"github.com/llorch/pool-managerd/internal/check/warmup"
	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/engine"
	"github.com/llorch/pool-managerd/internal/gpu"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/metrics"
	"github.com/llorch/pool-managerd/internal/model"
	"github.com/llorch/pool-managerd/internal/policy"
	"github.com/llorch/pool-managerd/internal/safetext"
	"github.com/llorch/pool-managerd/internal/sockdiag"
	"github.com/llorch/pool-managerd/internal/state"
	"github.com/llorch/pool-managerd/internal/witness"
)

// Config is what a supervisor needs to know about its pool.
type Config struct {
	Pool string
	// Build is the engine to run for a staged model path.
	Build     func(model string) engine.Spec
	HealthURL string
	Health    config.Health // specifiers expanded
	Restart   policy.Params
	// Model is the ref as configured; ModelDigest the digest it must have
	// ("" to accept any).
	Model, ModelDigest string
	EngineVersion      string
	// VersionCommand, when set, is run by the shim beside each engine to learn the
	// engine's version (an upgraded binary shows after a reload).
	VersionCommand []string
	DeviceMask     string
	// Slots caps the leases on the pool (0: no cap).
	Slots uint32
	// Stager validates and stages models.
	Stager Stager
	// Records holds the runtime record of a running engine; State the
	// persisted policy state.
	Records, State state.Dir
	// Holders lists the processes on the pool's GPUs (nil: not checked);
	// GPURetry is how often a start they hold looks again (0: the
	// lifecycle's default).
	Holders  func() ([]GPUHolder, error)
	GPURetry time.Duration
	// Asleep names the pools of the pool's group whose engines sleep
	// (parked asleep, Sleep=vllm; nil: none): a process of their scopes
	// on the GPUs is no holder, as asleep they keep little of its memory
	// (the memory check still counts what they keep).
	Asleep func() []string
	// Port is the engine's port (0: the HealthURL's): a listener on it
	// outside the pool's scope holds a start (PortRetry: how often it
	// looks again; 0: the lifecycle's default).
	Port      int
	PortRetry time.Duration
	// Memory reads the free memory of the pool's GPUs and who uses it
	// (nil: not known, as with the static inventory, of which Inventory
	// says so once); MemoryRequired is what a start needs free over them
	// (nil: the staged model's size times DefaultMemoryFactor; 0: no
	// check); MemoryRetry how often a start refused for it looks again
	// (0: the lifecycle's default).
	Memory         func() ([]gpu.DeviceMemory, error)
	MemoryRequired *uint64
	MemoryRetry    time.Duration
	Inventory      *gpu.Inventory
	// IdleStop, StartOnLease: see lifecycle.Config (IdleStop is 0 for a
	// pinned pool).
	IdleStop     time.Duration
	StartOnLease bool
	// Sleep, SleepLevel: [Engine] Sleep= and SleepLevel= (Sleep=vllm
	// needs Port).
	Sleep      config.Sleep
	SleepLevel int
	// IdleMark is the file under the runtime directory that says the
	// pool is idle, so that it stays idle across a daemon restart ("":
	// none).
	IdleMark string
}

// GPUHolder is a process with work (or an open device node) on one of the
// pool's GPUs.
type GPUHolder struct {
	GPU     string
	PID     int
	Command string
	// Unit is the systemd unit of its cgroup ("" if unknown).
	Unit string
}

// Stager validates and stages model files.
type Stager interface {
	// Resolve checks ref for the engine's user and for callers (a bus
	// caller who is not root).
	Resolve(ref string, callers ...model.User) (model.Source, error)
	Digest(src model.Source) (string, error)
	Stage(ref, want string) (model.Staged, error)
	// Hashing says how far the hash of ref has come, while one runs.
	Hashing(ref string) (read, size int64, ok bool)
}

// Snapshot is the pool's state at one moment: its lifecycle's View and
// what only the supervisor knows.
type Snapshot struct {
	lifecycle.View
	ID         string
	Slots      uint32
	Unit       string
	DeviceMask string
}

// Supervisor runs one pool.
type Supervisor struct {
	cfg     Config
	rt      *engine.Runtime
	log     *slog.Logger
	metrics *metrics.Set
	events  chan func()

	mu      sync.Mutex
	snap    Snapshot
	changed chan struct{}

	// owners are the connections that asked for a lease on the pool
	// (see mayHold).
	ownersMu sync.Mutex
	owners   map[string]struct{}

	// Owned by the loop.
	m    *lifecycle.Machine
	info [4]string // the pool_info labels set last
	// stateWas is the pool_state set last (stateSet: one was).
	stateWas lifecycle.State
	stateSet bool
	// recordDirty: the leases changed since the runtime record was last
	// written (at recordLast); recordAt is the pending write.
	recordDirty bool
	recordLast  time.Time
	recordAt    *time.Timer
	runs        map[lifecycle.RunID]*run
	timers      map[lifecycle.Timer]*time.Timer
	reqs        map[lifecycle.ReqID]chan lifecycle.Reply
	lastReq     lifecycle.ReqID
	stopping    chan struct{} // closed when the last stop of the scope is done
	// prep is the scope prepared for the scheduled restart (nil: none).
	prep *prepared
	// staged is when the last start was decided (its staging asked for,
	// which first waits for a stop of the scope under way), for the
	// start's journal entry.
	staged time.Time
	steps  lifecycle.Queue

	// memWait: the last launch was refused for want of GPU memory; the
	// next looks at the memory before it makes a scope.
	memWait bool
}

// run is one engine process: what the machine's RunID stands for.
type run struct {
	id      lifecycle.RunID
	e       *engine.Engine
	ctx     context.Context
	cancel  context.CancelFunc
	started time.Time
	staged  model.Staged
	exited  chan struct{}
	// checks are the run's health checks (nil until it is watched).
	checks *check.Run
	// serving is open while the pool is Ready on this run: only then
	// is a canary sent.
	serving check.Gate
	// Owned by the checks: the scope a check's peer must belong to.
	scopeOnce sync.Once
	scope     sockdiag.Scope
	scopeErr  error
	diag      *sockdiag.Conn
}

// holdExit bounds how long an exit that may be an operator's stop waits
// for systemd's word (and a scope systemd saw end waits for its shim's).
const holdExit = 500 * time.Millisecond

// New creates the supervisor; Run starts it. It restores the pool's
// persisted policy state, reporting a corrupt state file.
func New(cfg Config, rt *engine.Runtime, log *slog.Logger, m *metrics.Set) *Supervisor {
	s := &Supervisor{
		cfg: cfg, rt: rt, log: log, metrics: m,
		events:  make(chan func(), 64),
		changed: make(chan struct{}),
		runs:    map[lifecycle.RunID]*run{},
		timers:  map[lifecycle.Timer]*time.Timer{},
		reqs:    map[lifecycle.ReqID]chan lifecycle.Reply{},
		owners:  map[string]struct{}{},
	}
	m.InitPool(cfg.Pool)
	tr := policy.New(cfg.Restart, rand.Float64)
	held := ""
	if cfg.State.Path != "" {
		var st policy.State
		found, err := cfg.State.Load(cfg.Pool, &st)
		if err == nil && found {
			if cerr := st.Check(); cerr != nil {
				// Set aside too, so that a lifted hold starts afresh.
				err = cfg.State.SetAside(cfg.Pool, cerr)
			}
		}
		why, wasHeld := cfg.State.Held(cfg.Pool)
		switch {
		case err != nil:
			// Fail closed: fresh counters would be a way around an open
			// breaker, and so would a restart: the hold is kept on disk.
			held = fmt.Sprintf("persisted state unreadable (%v): held until ResetBreaker", err)
			log.Error("persisted pool state unreadable: pool held until ResetBreaker", journal.PoolID, cfg.Pool, journal.Error, err.Error())
			if herr := cfg.State.Hold(cfg.Pool, held); herr != nil {
				log.Error("cannot persist the pool's hold", journal.PoolID, cfg.Pool, journal.Error, herr.Error())
			}
		case wasHeld:
			held = why
			log.Error("pool held until ResetBreaker since an earlier start", journal.PoolID, cfg.Pool, journal.Error, why)
		case found:
			tr.Restore(st)
		}
	}
	ahead := time.Duration(0)
	if rt != nil {
		ahead = Ahead
	}
	s.m = lifecycle.New(lifecycle.Config{
		Pool: cfg.Pool, Unit: engine.UnitName(cfg.Pool), Model: cfg.Model, ModelDigest: cfg.ModelDigest,
		EngineVersion: cfg.EngineVersion, DeviceMask: cfg.DeviceMask, Slots: cfg.Slots,
		FailureThreshold: cfg.Health.FailureThreshold, Witness: rt != nil && rt.Witness != nil, HoldExit: holdExit,
		Warmup: cfg.Health.Warmup != nil, Stall: cfg.Health.Stall, DrainRequests: cfg.Health.ProgressURL != "", GPURetry: cfg.GPURetry, PortRetry: cfg.PortRetry, MemoryRetry: cfg.MemoryRetry, Ahead: ahead, Spread: rand.Float64,
		IdleStop: cfg.IdleStop, StartOnLease: cfg.StartOnLease, WakeTimeout: cfg.Health.StartTimeout,
		Sleep: cfg.Sleep == config.SleepVLLM && cfg.Port > 0, SleepLevel: cfg.SleepLevel,
	}, tr, held)
	s.snap = Snapshot{ID: cfg.Pool, Unit: engine.UnitName(cfg.Pool), DeviceMask: cfg.DeviceMask, Slots: cfg.Slots}
	s.snap.View = s.m.View(time.Now())
	return s
}

// Run is the pool's owner loop; it returns when ctx ends, leaving the
// engine running (engines outlive the daemon).
func (s *Supervisor) Run(ctx context.Context) {
	// A restored policy state has its gauges and next tick too.
	s.exec(s.m.Init(time.Now()))
	var unit <-chan *witness.Event
	if s.rt != nil && s.rt.Witness != nil {
		ch, stop := s.watchUnit()
		defer stop()
		unit = ch
	}
	// A prepared scope is no engine: it does not outlive the daemon.
	defer s.unprepare()
	for {
		select {
		case <-ctx.Done():
			return
		case f := <-s.events:
			f()
		case ev := <-unit:
			s.step(lifecycle.UnitChanged{Event: *ev})
		}
		if s.recordDirty && len(s.events) == 0 && len(unit) == 0 {
			s.leasesIdle()
		}
	}
}

// step feeds one event to the machine and carries out its actions. An
// action that reports at once (a launch) queues its event until every
// action of the step is done: the machine's actions are carried out in
// the order it gave them, never interleaved with a later step's.
func (s *Supervisor) step(ev lifecycle.Event) {
	s.steps.Feed(ev, func(ev lifecycle.Event) { s.exec(s.m.Step(time.Now(), ev)) })
}

func (s *Supervisor) exec(actions []lifecycle.Action) {
	for _, a := range actions {
		switch a := a.(type) {
		case lifecycle.Stage:
			s.stage(a)
		case lifecycle.Launch:
			s.launch(a)
		case lifecycle.Prepare:
			s.prepare(a)
		case lifecycle.Unprepare:
			s.unprepare()
		case lifecycle.Watch:
			if r := s.runs[a.Run]; r != nil {
				s.watch(r, a.StartBy)
			}
		case lifecycle.Warmup:
			if r := s.runs[a.Run]; r != nil && r.checks != nil {
				r.checks.Trigger(warmup.Name)
			}
		case lifecycle.ReadProgress:
			if r := s.runs[a.Run]; r != nil && r.checks != nil {
				r.checks.Trigger(progress.Name)
			}
		case lifecycle.StopProbes:
			if r := s.runs[a.Run]; r != nil {
				r.cancel()
			}
		case lifecycle.StopScope:
			s.stopScope(s.runs[a.Run], a.Run)
		case lifecycle.WriteRecord:
			if r := s.runs[a.Run]; r != nil {
				s.writeRecord(r, a)
			}
		case lifecycle.RemoveRecord:
			s.removeRecord()
		case lifecycle.LeasesChanged:
			s.recordDirty = true
		case lifecycle.ArmTimer:
			s.arm(a)
		case lifecycle.CancelTimer:
			if t := s.timers[a.Timer]; t != nil {
				t.Stop()
				delete(s.timers, a.Timer)
			}
		case lifecycle.Reply:
			if ch := s.reqs[a.Req]; ch != nil {
				delete(s.reqs, a.Req)
				ch <- a
				// The caller waits in this P's next slot: it answers now,
				// before the loop logs and publishes the step (whose
				// PropertiesChanged the bus would route before the
				// reply); a busy host has no other CPU to take it.
				runtime.Gosched()
			}
		case lifecycle.Publish:
			s.publish(a.View)
		case lifecycle.Heartbeat:
			s.beat(a.At)
		case lifecycle.Journal:
			s.journal(a)
		case lifecycle.Log:
			attrs := append([]any{journal.PoolID, s.cfg.Pool}, a.Attrs...)
			if a.Engine {
				snap := s.Snapshot()
				attrs = append(attrs, journal.EngineVersion, snap.EngineVersion, journal.Model, snap.Model, journal.DeviceMask, s.cfg.DeviceMask)
			}
			s.log.Log(context.Background(), a.Level, a.Msg, attrs...)
		case lifecycle.CountHealthFailure:
			s.metrics.HealthCheckFailures.WithLabelValues(s.cfg.Pool).Inc()
		case lifecycle.CountForcedDrain:
			s.metrics.DrainForceStops.WithLabelValues(s.cfg.Pool).Inc()
		case lifecycle.CountIdleStop:
			s.metrics.IdleStops.WithLabelValues(s.cfg.Pool).Inc()
		case lifecycle.CountLeaseStart:
			s.metrics.LeaseStarts.WithLabelValues(s.cfg.Pool).Inc()
		case lifecycle.Sleep:
			if r := s.runs[a.Run]; r != nil && r.checks != nil {
				r.checks.Trigger(sleep.SleepName)
			}
		case lifecycle.Wake:
			if r := s.runs[a.Run]; r != nil && r.checks != nil {
				r.checks.Trigger(sleep.WakeName)
			}
		case lifecycle.CountWake:
			s.metrics.Wakes.WithLabelValues(s.cfg.Pool, a.Result).Inc()
			if a.Result == "ok" {
				s.metrics.WakeDuration.WithLabelValues(s.cfg.Pool).Observe(a.Took.Seconds())
			}
		case lifecycle.CountDrain:
			s.metrics.Drains.WithLabelValues(s.cfg.Pool, a.Result.Outcome).Inc()
			s.metrics.DrainDuration.WithLabelValues(s.cfg.Pool, a.Result.Outcome).Observe(a.Result.Done.Sub(a.Start).Seconds())
		default:
			s.log.Error(fmt.Sprintf("lifecycle action %T not understood", a), journal.PoolID, s.cfg.Pool)
		}
	}
}

// journal writes policy decisions and crashes, updates their metrics and
// persists the policy state.
func (s *Supervisor) journal(a lifecycle.Journal) {
	journal.Emit(context.Background(), s.log, s.cfg.Pool, a.Events...)
	tr := s.m.Policy()
	s.metrics.Policy(s.cfg.Pool, a.Events, tr.Status(time.Now()))
	if a.Persist && s.cfg.State.Path != "" {
		if err := s.cfg.State.Save(s.cfg.Pool, tr.Save()); err != nil {
			s.log.Error("cannot persist the pool state", journal.PoolID, s.cfg.Pool, journal.Error, err.Error())
		}
	}
}

func (s *Supervisor) arm(a lifecycle.ArmTimer) {
	if t := s.timers[a.Timer]; t != nil {
		t.Stop()
	}
	s.timers[a.Timer] = time.AfterFunc(time.Until(a.At), func() {
		s.post(func() { s.step(lifecycle.TimerFired{Timer: a.Timer, Gen: a.Gen}) })
	})
}

// watchUnit queues systemd's events on the engine's scope for the loop;
// the witness must not wait for the loop. Pointers: the queue stands for
// the pool's whole life, and its events by value would be 8 KiB a pool.
func (s *Supervisor) watchUnit() (<-chan *witness.Event, func()) {
	ch := make(chan *witness.Event, unitQueue)
	cancel := s.rt.Witness.Watch(engine.UnitName(s.cfg.Pool), func(ev witness.Event) {
		select {
		case ch <- &ev:
		default:
			s.log.Warn("systemd's events on the engine's scope come faster than the pool takes them: one dropped", journal.PoolID, s.cfg.Pool)
		}
	})
	return ch, cancel
}

// unitQueue is how many of systemd's events on the scope wait for the
// loop before one is dropped.
const unitQueue = 64

// post runs f on the loop.
func (s *Supervisor) post(f func()) { s.events <- f }

// call runs f on the loop and returns its error.
func (s *Supervisor) call(f func() error) error {
	errc := make(chan error, 1)
	s.post(func() { errc <- f() })
	return <-errc
}

// request feeds the machine the event mk makes for a new request id; the
// channel gets the machine's reply (at once or much later).
func (s *Supervisor) request(mk func(lifecycle.ReqID) lifecycle.Event) chan lifecycle.Reply {
	ch := make(chan lifecycle.Reply, 1)
	s.post(func() {
		s.lastReq++
		id := s.lastReq
		s.reqs[id] = ch
		s.step(mk(id))
	})
	return ch
}

// Ping returns once the pool's loop has run a no-op: a watchdog that pings
// every loop notices one that hangs.
func (s *Supervisor) Ping(ctx context.Context) error {
	done := make(chan struct{})
	select {
	case s.events <- func() { close(done) }:
	case <-ctx.Done():
		return fmt.Errorf("pool %s: loop not taking events: %w", s.cfg.Pool, ctx.Err())
	}
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("pool %s: loop hung: %w", s.cfg.Pool, ctx.Err())
	}
}

// beat records a good probe's time. A heartbeat alone wakes nobody: it
// is read, not watched.
func (s *Supervisor) beat(at time.Time) {
	s.mu.Lock()
	s.snap.LastHeartbeat = latest(s.snap.LastHeartbeat, at)
	s.mu.Unlock()
}

func latest(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// Snapshot returns the current state.
func (s *Supervisor) Snapshot() Snapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.snap
	c.HealthFailures = slices.Clone(c.HealthFailures)
	c.Policy.Breakers = maps.Clone(c.Policy.Breakers)
	return c
}

// Wait blocks until cond holds for the state or ctx ends.
func (s *Supervisor) Wait(ctx context.Context, cond func(Snapshot) bool) (Snapshot, error) {
	for {
		s.mu.Lock()
		snap, ch := s.snap, s.changed
		s.mu.Unlock()
		if cond(snap) {
			return snap, nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return snap, fmt.Errorf("pool %s: %w (state %s, last error %q)", snap.ID, ctx.Err(), snap.State, snap.LastError)
		}
	}
}

// publish makes v the published state and its metrics.
func (s *Supervisor) publish(v lifecycle.View) {
	// A canary only while the pool serves: not asleep, waking, idle or
	// stopping.
	for _, r := range s.runs {
		if v.State == lifecycle.Ready {
			r.serving.Open()
		} else {
			r.serving.Shut()
		}
	}
	s.mu.Lock()
	// The probes' beats (check.Result.Beat) are not the machine's.
	v.LastHeartbeat = latest(v.LastHeartbeat, s.snap.LastHeartbeat)
	s.snap.View = v
	snap := s.snap
	close(s.changed)
	s.changed = make(chan struct{})
	s.mu.Unlock()
	b := func(v bool) float64 {
		if v {
			return 1
		}
		return 0
	}
	id := snap.ID
	s.metrics.PoolReady.WithLabelValues(id).Set(b(snap.Ready))
	s.metrics.PoolLive.WithLabelValues(id).Set(b(snap.Live))
	s.metrics.PoolDraining.WithLabelValues(id).Set(b(snap.Draining))
	if !s.stateSet || snap.State != s.stateWas {
		// One series a state: set when the state changes, not on every
		// publish (a lease call publishes).
		s.metrics.SetPoolState(id, snap.State)
		s.markIdle(snap, s.stateSet && s.stateWas == lifecycle.Idle)
		s.stateSet, s.stateWas = true, snap.State
	}
	s.metrics.ActiveLeases.WithLabelValues(id).Set(float64(snap.ActiveLeases))
	info := [4]string{id, snap.Model, snap.EngineVersion, snap.DeviceMask}
	if info != s.info {
		if s.info[0] != "" {
			s.metrics.PoolInfo.DeleteLabelValues(s.info[:]...)
		}
		s.metrics.PoolInfo.WithLabelValues(info[:]...).Set(1)
		s.info = info
	}
	s.metrics.Touch()
}

// Start starts the engine of a stopped or failed pool and returns once it
// runs (its model staged, which the first time may take a while). A pool whose
// breaker holds it stays held: neither a start nor a Stop then Start is a
// way around the breaker; ResetBreaker and AllowRestart are.
func (s *Supervisor) Start() error {
	rep := <-s.request(func(id lifecycle.ReqID) lifecycle.Event { return lifecycle.StartRequested{Req: id} })
	return rep.Err
}

// Stop is a drain with deadline 0: leases are revoked and the engine
// stopped at once (SIGTERM, SIGKILL after its stop timeout).
func (s *Supervisor) Stop(ctx context.Context) error {
	_, err := s.Drain(ctx, 0)
	return err
}

// Drain stops new leases at once (Draining, not Ready), waits until the
// last lease is released or the deadline passes (then revokes them), stops
// the engine and returns the outcome. A drain of a stopped pool is drained
// at once; concurrent drains share one outcome. ctx only bounds the wait.
func (s *Supervisor) Drain(ctx context.Context, deadline time.Duration) (lifecycle.DrainResult, error) {
	ch := s.request(func(id lifecycle.ReqID) lifecycle.Event {
		return lifecycle.DrainRequested{Req: id, Deadline: deadline}
	})
	select {
	case rep := <-ch:
		return rep.Drain, rep.Err
	case <-ctx.Done():
		return lifecycle.DrainResult{}, ctx.Err()
	}
}

// Park gives the pool's GPUs to another pool of its group: a drain
// (leases honoured up to deadline) that leaves the pool Idle, reason
// group, for its next use to start (see lifecycle.ParkRequested). ctx only
// bounds the wait.
func (s *Supervisor) Park(ctx context.Context, deadline time.Duration) (lifecycle.DrainResult, error) {
	ch := s.request(func(id lifecycle.ReqID) lifecycle.Event {
		return lifecycle.ParkRequested{Req: id, Deadline: deadline}
	})
	select {
	case rep := <-ch:
		return rep.Drain, rep.Err
	case <-ctx.Done():
		return lifecycle.DrainResult{}, ctx.Err()
	}
}

// EnsureReady answers once the pool is Ready: at once if it is, else
// after the start it makes (an idle, stopped, failed or backoff pool, the
// breaker permitting) or joins, which callers share. timeout bounds the
// wait (0: the pool's StartTimeoutSec; at most lifecycle.MaxWakeTimeout);
// a start that fails or a wait that ends answers ErrNotReady. ctx only
// bounds the wait.
func (s *Supervisor) EnsureReady(ctx context.Context, timeout time.Duration) error {
	ch := s.request(func(id lifecycle.ReqID) lifecycle.Event {
		return lifecycle.EnsureReadyRequested{Req: id, Timeout: timeout}
	})
	select {
	case rep := <-ch:
		return rep.Err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// ResetBreaker closes the pool's breakers (and lifts the hold of an
// unreadable state file); a held restart happens now.
func (s *Supervisor) ResetBreaker() {
	s.post(func() {
		s.step(lifecycle.ResetBreakerRequested{})
		if s.cfg.State.Path != "" {
			if err := s.cfg.State.Release(s.cfg.Pool); err != nil {
				s.log.Error("cannot remove the pool's hold file", journal.PoolID, s.cfg.Pool, journal.Error, err.Error())
			}
		}
	})
}

// AllowRestart lets a held restart happen once, now.
func (s *Supervisor) AllowRestart() error {
	rep := <-s.request(func(id lifecycle.ReqID) lifecycle.Event { return lifecycle.AllowRestartRequested{Req: id} })
	return rep.Err
}

// XID reports an NVML critical XID event on one of the pool's GPUs: the
// engine cannot be trusted any more and is restarted.
func (s *Supervisor) XID(uuid string, xid uint64) {
	s.post(func() {
		s.step(lifecycle.Faulted{What: fmt.Sprintf("NVML: Xid %d on %s", xid, uuid), XID: true, Code: xid, GPU: uuid})
	})
}

// stage stages a start's model off the loop, for hashing a big model takes
// minutes and the pool must keep answering; the next start waits for a
// stop of the scope under way, which must not reach the next engine.
func (s *Supervisor) stage(a lifecycle.Stage) {
	s.staged = time.Now()
	stopped, pr := s.stopping, s.prep
	go func() {
		if stopped != nil {
			<-stopped
		}
		if pr != nil {
			// Its staging of the same model comes first: then this
			// one is the digest cache's.
			<-pr.done
		}
		stop := s.watchHash(a.Ref, func(frac float64) lifecycle.Event {
			return lifecycle.StageProgress{Run: a.Run, Fraction: frac}
		})
		st, err := s.cfg.Stager.Stage(a.Ref, a.Want)
		stop()
		s.post(func() { s.step(lifecycle.ModelStaged{Run: a.Run, Staged: st, Err: err}) })
	}()
}

// hashShowingProgress digests a reload's model (minutes for a big one)
// while the pool shows the hash's progress.
func (s *Supervisor) hashShowingProgress(src model.Source, ref string) (string, error) {
	stop := s.watchHash(ref, func(frac float64) lifecycle.Event { return lifecycle.Hashing{Fraction: frac} })
	digest, err := s.cfg.Stager.Digest(src)
	// No progress of this hash may come after the reload's request.
	stop()
	if err != nil {
		// Else the reload's request says the hash is over: no gap
		// between the two.
		s.post(func() { s.step(lifecycle.Hashing{Done: true}) })
	}
	return digest, err
}

// progressEvery bounds how often progress is told: the Progress property
// changes at most 4 times a second.
const progressEvery = 250 * time.Millisecond

// watchHash tells the machine, as event says, how far the hash of ref has
// come, until stop returns; nothing is told after.
func (s *Supervisor) watchHash(ref string, event func(frac float64) lifecycle.Event) (stop func()) {
	done, finished := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(progressEvery)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
			}
			if read, size, ok := s.cfg.Stager.Hashing(ref); ok && size > 0 {
				ev := event(float64(read) / float64(size))
				select {
				case s.events <- func() { s.step(ev) }:
				case <-done:
					return
				}
			}
		}
	}()
	return func() {
		close(done)
		<-finished
	}
}

// launch starts the engine of a run on its staged model, on the loop, and
// tells the machine at once. A prepared scope for that model is used:
// only the GPU check and the engine's exec are left then.
func (s *Supervisor) launch(a lifecycle.Launch) {
	st := a.Staged
	started := time.Now()
	decided := s.staged
	if decided.IsZero() {
		decided = started
	}
	spec := s.spec(st, a.Candidate, started)
	for _, n := range spec.DeviceNodes {
		if _, err := os.Stat(n); err != nil {
			err = fmt.Errorf("GPU device node %s is missing (is the NVIDIA driver loaded?): %w", n, err)
			s.unprepare()
			s.step(lifecycle.StartFailed{Run: a.Run, Err: err})
			return
		}
	}
	if s.memWait {
		if err := s.memoryPreflight(st); err != nil {
			s.unprepare()
			s.step(lifecycle.StartFailed{Run: a.Run, Err: err})
			return
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	startCtx, stop := context.WithTimeout(ctx, 30*time.Second)
	checked := time.Now()
	// caution is set by the precheck, which is done before a start
	// returns.
	var caution string
	e, err := s.startPrepared(startCtx, a, st, s.precheck(st, &caution))
	if e == nil && err == nil {
		spec.Precheck = s.precheck(st, &caution)
		checked = time.Now()
		e, err = s.rt.Start(startCtx, spec)
	}
	stop()
	s.memWait = errors.Is(err, lifecycle.ErrNoGPUMemory)
	if err != nil {
		cancel()
		s.step(lifecycle.StartFailed{Run: a.Run, Err: err})
		return
	}
	// How long from the decision to start (staging the model) to an
	// engine running in its scope, and where it went: the restart
	// overhead make bench reports. With a prepared scope, SHIM_USEC and
	// SCOPE_USEC were spent AHEAD_USEC before the go-ahead.
	s.log.Info("engine process started", journal.PoolID, s.cfg.Pool, journal.Unit, e.Unit,
		journal.StartUsec, time.Since(decided).Microseconds(),
		journal.StageUsec, started.Sub(decided).Microseconds(), journal.CheckUsec, (checked.Sub(started) + e.Phases.Precheck).Microseconds(),
		journal.ShimUsec, e.Phases.Shim.Microseconds(), journal.ScopeUsec, e.Phases.Scope.Microseconds(),
		journal.ExecUsec, (e.Phases.Exec + e.Phases.Invocation).Microseconds(), journal.LeftoverUsec, e.Phases.Leftover.Microseconds(),
		journal.AheadUsec, e.Phases.Ahead.Microseconds())
	r := &run{id: a.Run, e: e, ctx: ctx, cancel: cancel, started: time.Now(), staged: st, exited: make(chan struct{})}
	s.adoptHandle(r)
	s.step(lifecycle.EngineStarted{Run: a.Run, PID: e.PID, Invocation: e.Invocation, Caution: caution})
}

// spec is the engine to start on st, with the note its shim keeps for a
// restarted daemon.
func (s *Supervisor) spec(st model.Staged, candidate bool, started time.Time) engine.Spec {
	spec := s.cfg.Build(st.Path)
	spec.Note, _ = json.Marshal(startNote{Model: st.Ref, Digest: st.Digest, StagedPath: st.Path, Candidate: candidate, StartedAt: started})
	return spec
}

// leftoverWait bounds how long a leftover of the pool's own scope may take
// to die.
const leftoverWait = 5 * time.Second

// precheck is the check before an engine starts on st: the pool's port
// and GPUs must be free of other processes, and the GPUs must have the
// memory the pool needs. The GPUs' holders and memory are read while
// systemd makes the scope; what is in the scope's cgroup is the pool's
// own. What it could not make sure of goes to caution.
func (s *Supervisor) precheck(st model.Staged, caution *string) engine.Precheck {
	return func(scope func() (uint64, error)) error {
		var holders []GPUHolder
		var herr error
		if s.cfg.Holders != nil {
			holders, herr = s.cfg.Holders()
		}
		var mem []gpu.DeviceMemory
		var merr error
		if s.cfg.Memory != nil && s.memoryNeeded(st) > 0 {
			mem, merr = s.cfg.Memory()
		}
		own, err := scope()
		if err != nil {
			// Nothing is the pool's own then: every holder is foreign
			// (a scope that was not made fails the start anyway).
			s.log.Debug("cannot tell the engine's scope by its cgroup", journal.PoolID, s.cfg.Pool, journal.Error, safetext.Bound(err.Error()))
			own = 0
		}
		if err := s.portFree(own); err != nil {
			return err
		}
		if err := s.memoryFits(st, mem, merr, own); err != nil {
			return err
		}
		if s.cfg.Holders == nil {
			return nil
		}
		return s.gpusFree(holders, herr, own, caution)
	}
}

// gpusFree makes sure no process holds the pool's GPUs before an engine
// starts on them. A process is the pool's own leftover only when it is in
// the scope's cgroup (own), whatever its unit is called: it is killed
// through a pidfd and waited for. Any other process, and one of the
// scope's that cannot be signalled (the daemon has no CAP_KILL), is an
// ErrGPUBusy naming it. A failure to look is logged, not fatal: the
// engine's own start will tell; a look that could not see every process
// starts the engine and says so in caution.
func (s *Supervisor) gpusFree(holders []GPUHolder, err error, own uint64, caution *string) error {
	var unchecked *gpu.UncheckedError
	if errors.As(err, &unchecked) {
		*caution = "GPU check incomplete: " + err.Error()
		return nil
	}
	if err != nil {
		s.log.Warn("cannot list the processes on the pool's GPUs", journal.PoolID, s.cfg.Pool, journal.Error, safetext.Bound(err.Error()))
		return nil
	}
	unit := engine.UnitName(s.cfg.Pool)
	var asleep []string
	if s.cfg.Asleep != nil {
		asleep = s.cfg.Asleep()
	}
	type leftover struct {
		p *engine.Process
		h GPUHolder
	}
	var mine []leftover
	defer func() {
		for _, l := range mine {
			l.p.Close()
		}
	}()
	for _, h := range holders {
		p, err := engine.OpenProcess(h.PID)
		if errors.Is(err, engine.ErrGone) {
			continue
		}
		if err != nil {
			return fmt.Errorf("GPU %s in use by pid %d (%s), which cannot be looked at (%v): %w", h.GPU, h.PID, safetext.Bound(h.Command), err, lifecycle.ErrGPUBusy)
		}
		if (own == 0 || p.CgroupID != own) && sleepingPeer(p.CgroupID, asleep) {
			p.Close()
			continue
		}
		if own == 0 || p.CgroupID != own {
			what := p.Named(safetext.Bound(h.Command))
			p.Close()
			return fmt.Errorf("GPU %s in use by %s, outside %s: %w", h.GPU, what, unit, lifecycle.ErrGPUBusy)
		}
		mine = append(mine, leftover{p, h})
	}
	for _, l := range mine {
		err := l.p.Signal(syscall.SIGKILL)
		if errors.Is(err, engine.ErrGone) {
			continue
		}
		if err != nil {
			// One that cannot be signalled is foreign, wherever it is.
			return fmt.Errorf("GPU %s in use by %s in %s, which the daemon cannot signal (%v): %w",
				l.h.GPU, l.p.Named(safetext.Bound(l.h.Command)), unit, err, lifecycle.ErrGPUBusy)
		}
		s.log.Warn(fmt.Sprintf("a leftover of the pool's own engine (pid %d) holds its GPU: killed", l.p.PID), journal.PoolID, s.cfg.Pool, journal.Unit, unit)
	}
	deadline := time.Now().Add(leftoverWait)
	for _, l := range mine {
		if !l.p.Wait(time.Until(deadline)) {
			return fmt.Errorf("a leftover of the pool's own engine (%s) holds GPU %s and did not die within %s: %w", l.p, l.h.GPU, leftoverWait, lifecycle.ErrGPUBusy)
		}
	}
	return nil
}

// sleepingPeer says whether the cgroup id is the scope (or beneath the
// scope) of one of the pools named, as the system manager makes it: told
// by its whole path, not by a unit name anyone may give a cgroup of their
// own.
func sleepingPeer(id uint64, pools []string) bool {
	if len(pools) == 0 {
		return false
	}
	path, err := sockdiag.CgroupPathOfID(id)
	if err != nil {
		return false
	}
	for _, pool := range pools {
		scope := engine.ScopeCgroup(pool)
		if path == scope || strings.HasPrefix(path, scope+"/") {
			return true
		}
	}
	return false
}

// port is the engine's port: Port=, else the HealthURL's (0: none).
func (s *Supervisor) port() uint16 {
	if s.cfg.Port > 0 && s.cfg.Port < 1<<16 {
		return uint16(s.cfg.Port)
	}
	if u, err := url.Parse(s.cfg.HealthURL); err == nil {
		if p, err := strconv.ParseUint(u.Port(), 10, 16); err == nil {
			return uint16(p)
		}
	}
	return 0
}

// portScope is what a listener on the engine's port must belong to: the
// scope's cgroup (own), or where that cannot be told the engine's user.
func (s *Supervisor) portScope(own uint64) sockdiag.Scope {
	sc := sockdiag.Scope{Unit: engine.UnitName(s.cfg.Pool), CgroupID: own, UID: ^uint32(0)}
	spec := s.cfg.Build("")
	who := spec.Account
	if who == nil {
		who = func() (model.User, error) { return model.LookupUser(spec.User) }
	}
	if u, err := who(); err == nil {
		sc.UID = u.UID
	}
	return sc
}

// squatter names a listener on the engine's port outside the scope whose
// cgroup is own ("": none, or it could not be told).
func (s *Supervisor) squatter(own uint64) string {
	port := s.port()
	if port == 0 {
		return ""
	}
	f, err := sockdiag.Squatter(port, s.portScope(own))
	if err != nil {
		s.log.Warn("cannot list the listeners on the engine's port", journal.PoolID, s.cfg.Pool, journal.Error, safetext.Bound(err.Error()))
		return ""
	}
	if f == nil {
		return ""
	}
	return f.Error()
}

// portFree refuses a start while a process outside the scope listens on
// the engine's port: the engine could not bind it (its exit would count
// as a crash), or would share it with the squatter.
func (s *Supervisor) portFree(own uint64) error {
	if who := s.squatter(own); who != "" {
		return fmt.Errorf("%s: the engine is not started until the port is free: %w", who, lifecycle.ErrPortBusy)
	}
	return nil
}

// GPUUnhealthy holds the pool: one of its GPUs needs a reset (why says
// which, the XID and the remedy).
func (s *Supervisor) GPUUnhealthy(gpu, why string) {
	s.post(func() { s.step(lifecycle.GPUUnhealthy{GPU: gpu, Why: why}) })
}

// GPUUsable lifts the hold of a GPU that is usable again.
func (s *Supervisor) GPUUsable(gpu string) {
	s.post(func() { s.step(lifecycle.GPUUsable{GPU: gpu}) })
}

// adoptHandle makes r the process behind its run id and forwards its
// shim's reports to the loop.
func (s *Supervisor) adoptHandle(r *run) {
	s.runs[r.id] = r
	r.e.OnDied(func() { s.post(func() { s.step(lifecycle.Died{Run: r.id}) }) })
	go func() {
		for ev := range r.e.Events() {
			s.post(func() { s.engineEvent(r, ev) })
		}
	}()
}

// engineEvent is the shim's report on a run.
func (s *Supervisor) engineEvent(r *run, ev engine.Event) {
	if ev.Fault != "" {
		s.step(lifecycle.Faulted{Run: r.id, What: ev.Fault})
		return
	}
	if ev.Version != "" || ev.VersionErr != "" {
		s.versionKnown(ev.Version, ev.VersionErr)
		return
	}
	if ev.Exit == nil {
		return
	}
	x := *ev.Exit
	if !x.Lost && x.Status.Exited() && x.Status.ExitStatus() != 0 {
		// An engine whose bind failed exits so: who holds its port now
		// decides whether the exit is its own.
		x.PortHeld = s.squatter(r.e.CgroupID)
	}
	s.step(lifecycle.Exited{Run: r.id, Exit: x})
	if s.runs[r.id] == r {
		delete(s.runs, r.id)
		r.cancel()
		close(r.exited)
	}
}

// versionKnown records what VersionCommand said: its shim ran it beside
// the engine, as the engine's user in its scope. Its output is the
// engine's text: "version: X" in it (as llama-server prints it), else its
// first line, is the version.
func (s *Supervisor) versionKnown(out, failed string) {
	v := ""
	for l := range strings.Lines(out) {
		l = strings.TrimSpace(l)
		if x, ok := strings.CutPrefix(l, "version: "); ok {
			v = x
			break
		}
		if v == "" {
			v = l
		}
	}
	if v == "" {
		s.log.Warn("VersionCommand failed", journal.PoolID, s.cfg.Pool, journal.Error, safetext.Bound(cmp.Or(failed, "it printed nothing")))
		return
	}
	s.step(lifecycle.VersionKnown{Version: safetext.Bound(v)})
}

// stopScope stops the engine's scope in the background (r nil: whatever
// runs in it) and tells the machine when systemd's job ends (id: the run
// it stops). The next start waits for it: a stop by name must not reach
// the next engine's scope.
func (s *Supervisor) stopScope(r *run, id lifecycle.RunID) {
	staged := s.m.View(time.Now()).StagedPath
	if r != nil {
		r.cancel()
		staged = r.staged.Path
	}
	stopTimeout := s.cfg.Build(staged).StopTimeout
	done := make(chan struct{})
	s.stopping = done
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), stopTimeout+30*time.Second)
		if err := s.rt.Stop(ctx, s.cfg.Pool); err != nil {
			s.log.Error("stopping engine", journal.PoolID, s.cfg.Pool, journal.Error, err.Error())
		}
		cancel()
		close(done)
		s.post(func() { s.step(lifecycle.ScopeStopped{Run: id}) })
	}()
}

// Reload swaps the pool's model atomically: the ref is validated first
// (a bad one changes nothing), the pool drained, the model staged, the old
// engine stopped and the new one started and awaited; if the new engine
// does not become healthy it is killed and the old model restored and
// awaited, and the error says it rolled back and why. The same model as
// running is a success that restarts nothing.
func (s *Supervisor) Reload(ctx context.Context, ref string, drainDeadline time.Duration) (string, error) {
	start := time.Now()
	fail := func(reason string, err error) (string, error) {
		s.metrics.ReloadFailure.WithLabelValues(s.cfg.Pool, reason).Inc()
		s.metrics.ReloadDuration.WithLabelValues(s.cfg.Pool, "failure").Observe(time.Since(start).Seconds())
		return "", err
	}
	// A bad ref (*model.RefError) is the caller's; anything else (the
	// engine's user unknown, a read error) is the host's.
	refFail := func(err error) (string, error) {
		var re *model.RefError
		if errors.As(err, &re) {
			return fail("invalid_model", fmt.Errorf("%w: %v", lifecycle.ErrInvalidArgument, err))
		}
		return fail("stage", fmt.Errorf("%w: %v (nothing changed)", lifecycle.ErrReloadFailed, err))
	}
	// A caller (model.WithCaller) names only what it could read itself.
	src, err := s.cfg.Stager.Resolve(ref, model.CallerOf(ctx)...)
	if err != nil {
		return refFail(err)
	}
	digest, err := s.hashShowingProgress(src, ref)
	if err != nil {
		return refFail(err)
	}
	ch := s.request(func(id lifecycle.ReqID) lifecycle.Event {
		return lifecycle.ReloadRequested{Req: id, Ref: ref, Digest: digest, Deadline: drainDeadline}
	})
	var rep lifecycle.Reply
	select {
	case rep = <-ch:
	case <-ctx.Done():
		return "", ctx.Err()
	}
	switch {
	case rep.Err != nil && rep.Reason != "":
		return fail(rep.Reason, rep.Err)
	case rep.Err != nil:
		return "", rep.Err
	}
	s.metrics.ReloadSuccess.WithLabelValues(s.cfg.Pool).Inc()
	s.metrics.ReloadDuration.WithLabelValues(s.cfg.Pool, "success").Observe(time.Since(start).Seconds())
	return ref, nil
}
