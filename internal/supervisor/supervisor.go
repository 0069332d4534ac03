// Package supervisor owns one pool: it is the only place the pool's state
// changes. The engine's shim, the health prober, timers, lease holders and
// operators report to its loop; it asks the restart policy what to do about
// a crash and does it, and it drains and reloads the pool.
package supervisor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/llorch/pool-managerd/internal/breaker"
	"github.com/llorch/pool-managerd/internal/crash"
	"github.com/llorch/pool-managerd/internal/engine"
	"github.com/llorch/pool-managerd/internal/health"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/metrics"
	"github.com/llorch/pool-managerd/internal/model"
	"github.com/llorch/pool-managerd/internal/policy"
	"github.com/llorch/pool-managerd/internal/safetext"
	"github.com/llorch/pool-managerd/internal/sockdiag"
	"github.com/llorch/pool-managerd/internal/state"
	"github.com/llorch/pool-managerd/internal/witness"
)

// Pool states.
const (
	Stopped  = "stopped"
	Starting = "starting"
	Ready    = "ready"
	Backoff  = "backoff"
	Failed   = "failed"
	Draining = "draining"
)

// Config is what a supervisor needs to know about its pool.
type Config struct {
	Pool string
	// Build is the engine to run for a staged model path.
	Build     func(model string) engine.Spec
	HealthURL string
	Health    HealthConfig
	Restart   policy.Params
	// Model is the ref as configured; ModelDigest the digest it must have
	// ("" to accept any).
	Model, ModelDigest string
	EngineVersion      string
	// VersionCommand, when set, is run before each start to learn the
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
}

// HealthConfig is the pool's [Health] section.
type HealthConfig struct {
	Interval, Timeout, StartTimeout time.Duration
	FailureThreshold                int
}

// Stager validates and stages model files.
type Stager interface {
	Resolve(ref string) (model.Source, error)
	Digest(src model.Source) (string, error)
	Stage(ref, want string) (model.Staged, error)
}

// Snapshot is the pool's state at one moment.
type Snapshot struct {
	ID           string
	State        string
	Live, Ready  bool
	Draining     bool
	ActiveLeases uint32
	Slots        uint32
	LastError    string
	LastReason   crash.Reason
	CrashCount   uint64
	RestartCount uint64
	// FailureStreak is the run of crashes the backoff counts; unlike
	// CrashCount it starts over after a stable run or ResetBreaker.
	FailureStreak int
	BreakerState  string
	// NextRestart is when a pending restart is due (zero if none).
	NextRestart time.Time
	Unit        string
	MainPID     int
	// Model is the ref the pool runs (as configured or last reloaded),
	// ModelDigest the digest of what the engine loaded, StagedPath the
	// file it loaded.
	Model, ModelDigest, StagedPath string
	EngineVersion                  string
	DeviceMask                     string
	// HealthFailures are the times of the current run of failed probes.
	HealthFailures []time.Time
	// LastHeartbeat is the last successful health probe.
	LastHeartbeat time.Time
	// Starts counts engine starts, restarts included.
	Starts int
	// ReadyAt is when the current engine became ready.
	ReadyAt time.Time
}

// Supervisor runs one pool.
type Supervisor struct {
	cfg     Config
	rt      *engine.Runtime
	log     *slog.Logger
	metrics *metrics.Set
	tracker *policy.Tracker
	prober  *health.Prober
	events  chan func()

	mu      sync.Mutex
	snap    Snapshot
	changed chan struct{}

	// Owned by the loop.
	info [4]string // the pool_info labels set last
	// recordDirty: the leases changed since the runtime record was last
	// written (at recordLast); recordAt is the pending write.
	recordDirty bool
	recordLast  time.Time
	recordAt    *time.Timer
	run         *run
	current     model.Staged // what the running (or next) engine loads
	restartAt   *time.Timer
	tickAt      *time.Timer
	leases      map[string]string // lease id -> owner
	drain       *drainOp
	reload      *reloadOp
	staging     *startOp // a start waiting for its model to be staged
	pending     *pendingExit
	stopping    chan struct{} // closed when the last stop of the scope is done
	// held says why the pool may not start until ResetBreaker (its
	// persisted state could not be read); "" when it may.
	held string
}

// run is one engine process's life.
type run struct {
	e       *engine.Engine
	ctx     context.Context
	cancel  context.CancelFunc
	started time.Time
	healthy bool
	staged  model.Staged
	// stopping says why the manager stops it: "" (it is not), "drain",
	// "reload", "health", "start", "fault".
	stopping string
	// candidate is set for the new engine of a reload: its end is the
	// reload's business, not a crash to restart.
	candidate bool
	fault     string
	// xid is set when the fault came from NVML, not the engine's output.
	xid       bool
	failures  []time.Time
	lastProbe error
	exited    chan struct{}
	// startBy, when set, is when the engine must be healthy (an adopted
	// engine that was starting); else StartTimeoutSec from the probes'
	// start.
	startBy time.Time
	// Owned by the prober: the scope a probe's peer must belong to.
	scopeOnce sync.Once
	scope     sockdiag.Scope
	scopeErr  error
	// failing is set by the loop after a failed probe; squatted once a
	// foreign listener was reported.
	failing, squatted atomic.Bool
}

// New creates the supervisor; Run starts it. It restores the pool's
// persisted policy state, reporting a corrupt state file.
func New(cfg Config, rt *engine.Runtime, log *slog.Logger, m *metrics.Set) *Supervisor {
	s := &Supervisor{
		cfg: cfg, rt: rt, log: log, metrics: m,
		tracker: policy.New(cfg.Restart, rand.Float64),
		prober:  health.New(cfg.HealthURL, cfg.Health.Timeout),
		events:  make(chan func(), 64),
		changed: make(chan struct{}),
		leases:  map[string]string{},
	}
	m.InitPool(cfg.Pool)
	s.snap = Snapshot{ID: cfg.Pool, State: Stopped, BreakerState: breaker.Closed.String(), Unit: engine.UnitName(cfg.Pool),
		Model: cfg.Model, EngineVersion: cfg.EngineVersion, DeviceMask: cfg.DeviceMask, Slots: cfg.Slots}
	if cfg.State.Path != "" {
		var st policy.State
		found, err := cfg.State.Load(cfg.Pool, &st)
		if err == nil && found {
			err = st.Check()
			if err != nil {
				err = fmt.Errorf("%s: %w", cfg.State.File(cfg.Pool), err)
			}
		}
		switch {
		case err != nil:
			// Fail closed: fresh counters would be a way around an open
			// breaker.
			s.held = fmt.Sprintf("persisted state unreadable (%v): held until ResetBreaker", err)
			s.snap.State, s.snap.LastError = Failed, s.held
			log.Error("persisted pool state unreadable: pool held until ResetBreaker", journal.PoolID, cfg.Pool, journal.Error, err.Error())
		case found:
			s.tracker.Restore(st)
		}
	}
	s.refresh(&s.snap)
	return s
}

// Run is the pool's owner loop; it returns when ctx ends, leaving the
// engine running (engines outlive the daemon).
func (s *Supervisor) Run(ctx context.Context) {
	// A restored policy state has its gauges and next tick too.
	s.emit(nil)
	if s.rt != nil && s.rt.Witness != nil {
		defer s.watchUnit(ctx)()
	}
	for {
		select {
		case <-ctx.Done():
			return
		case f := <-s.events:
			f()
			if s.recordDirty && len(s.events) == 0 {
				s.leasesIdle()
			}
		}
	}
}

// watchUnit hands systemd's events on the engine's scope to the loop; the
// witness must not wait for the loop.
func (s *Supervisor) watchUnit(ctx context.Context) (stop func()) {
	ch := make(chan witness.Event, 32)
	cancel := s.rt.Witness.Watch(engine.UnitName(s.cfg.Pool), func(ev witness.Event) {
		select {
		case ch <- ev:
		default:
			s.log.Warn("systemd's events on the engine's scope come faster than the pool takes them: one dropped", journal.PoolID, s.cfg.Pool)
		}
	})
	go func() {
		for {
			select {
			case ev := <-ch:
				select {
				case s.events <- func() { s.unitEvent(ev) }:
				case <-ctx.Done():
					return
				}
			case <-ctx.Done():
				return
			}
		}
	}()
	return cancel
}

// post runs f on the loop.
func (s *Supervisor) post(f func()) { s.events <- f }

// call runs f on the loop and returns its error.
func (s *Supervisor) call(f func() error) error {
	errc := make(chan error, 1)
	s.post(func() { errc <- f() })
	return <-errc
}

// callThen runs check on the loop and, if it passes, then, and returns
// what then's done reports (later, on the loop).
func (s *Supervisor) callThen(check func() error, then func(done func(error))) error {
	errc := make(chan error, 1)
	s.post(func() {
		if err := check(); err != nil {
			errc <- err
			return
		}
		then(func(err error) { errc <- err })
	})
	return <-errc
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

// Snapshot returns the current state.
func (s *Supervisor) Snapshot() Snapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.snap
	c.HealthFailures = append([]time.Time(nil), s.snap.HealthFailures...)
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

func (s *Supervisor) refresh(p *Snapshot) {
	st := s.tracker.Status(time.Now())
	p.CrashCount, p.RestartCount, p.FailureStreak = st.CrashCount, st.RestartCount, st.Streak
	p.BreakerState = st.Breaker.String()
	p.ActiveLeases = uint32(len(s.leases))
	p.Draining = s.drain != nil
}

// update changes the published state; only the loop calls it.
func (s *Supervisor) update(f func(*Snapshot)) {
	s.mu.Lock()
	f(&s.snap)
	s.refresh(&s.snap)
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

// emit logs and counts policy events and persists the policy state.
func (s *Supervisor) emit(events []policy.Event) {
	var logged []policy.Event
	for _, e := range events {
		// The supervisor writes the crash entry itself, with the context
		// only it has.
		if _, ok := e.(policy.Crashed); !ok {
			logged = append(logged, e)
		}
	}
	journal.Emit(context.Background(), s.log, s.cfg.Pool, logged...)
	s.metrics.Policy(s.cfg.Pool, events, s.tracker.Status(time.Now()))
	if len(events) > 0 && s.cfg.State.Path != "" {
		if err := s.cfg.State.Save(s.cfg.Pool, s.tracker.Save()); err != nil {
			s.log.Error("persisting pool state: "+err.Error(), journal.PoolID, s.cfg.Pool)
		}
	}
	s.armTick()
}

// ErrBreakerOpen refuses a start while the circuit breaker holds the pool.
var ErrBreakerOpen = errors.New("the circuit breaker is open")

// Start starts the engine of a stopped or failed pool and returns once it
// runs (its model staged, which the first time may take a while). A pool whose
// breaker holds it stays held: neither a start nor a Stop then Start is a
// way around the breaker; ResetBreaker and AllowRestart are.
func (s *Supervisor) Start() error {
	return s.callThen(func() error {
		if s.run != nil || s.drain != nil || s.reload != nil || s.staging != nil || s.pending != nil {
			return fmt.Errorf("pool %s is %s: %w", s.cfg.Pool, s.Snapshot().State, ErrBusy)
		}
		if err := s.mayStart(); err != nil {
			return err
		}
		s.cancelRestart()
		return nil
	}, func(done func(error)) { s.startEngine(false, done) })
}

// mayStart asks the policy whether an engine may start on request now; a
// refusal keeps a pending restart scheduled for when it may.
func (s *Supervisor) mayStart() error {
	if s.held != "" {
		return fmt.Errorf("pool %s: %w: %s", s.cfg.Pool, ErrBreakerOpen, s.held)
	}
	now := time.Now()
	pending := s.tracker.Status(now).Pending
	pm, err := s.tracker.Start(now)
	s.emit(pm.Events)
	var r *policy.Refusal
	if errors.As(err, &r) {
		if pending {
			s.update(func(p *Snapshot) { p.State, p.NextRestart = Failed, r.RetryAt })
			if !r.RetryAt.IsZero() {
				s.scheduleRestart(r.RetryAt)
			}
		}
		return fmt.Errorf("pool %s: %w: %v", s.cfg.Pool, ErrBreakerOpen, err)
	}
	return err
}

// Stop is a drain with deadline 0: leases are revoked and the engine
// stopped at once (SIGTERM, SIGKILL after its stop timeout).
func (s *Supervisor) Stop(ctx context.Context) error {
	_, err := s.Drain(ctx, 0)
	return err
}

// ResetBreaker closes the pool's breakers (and lifts the hold of an
// unreadable state file); a held restart happens now.
func (s *Supervisor) ResetBreaker() {
	s.post(func() {
		if s.held != "" {
			s.log.Warn("hold lifted by ResetBreaker: the pool starts with fresh counters", journal.PoolID, s.cfg.Pool)
			s.held = ""
			if s.snap.State == Failed && s.run == nil {
				s.update(func(p *Snapshot) { p.State = Stopped })
			}
		}
		now := time.Now()
		s.emit(s.tracker.ResetBreaker(now))
		if s.tracker.Status(now).Pending && s.drain == nil {
			s.scheduleRestart(now)
		}
		s.update(func(*Snapshot) {})
	})
}

// AllowRestart lets a held restart happen once, now.
func (s *Supervisor) AllowRestart() error {
	return s.call(func() error {
		ev, err := s.tracker.AllowRestart(time.Now())
		s.emit(ev)
		if err == nil && s.drain == nil {
			s.scheduleRestart(time.Now())
		}
		return err
	})
}

func (s *Supervisor) cancelRestart() {
	if s.restartAt != nil {
		s.restartAt.Stop()
		s.restartAt = nil
	}
}

func (s *Supervisor) scheduleRestart(at time.Time) {
	s.cancelRestart()
	var t *time.Timer
	t = time.AfterFunc(time.Until(at), func() {
		s.post(func() {
			// A restart cancelled (or rescheduled) after the timer fired
			// must not happen.
			if s.restartAt == t {
				s.restartDue()
			}
		})
	})
	s.restartAt = t
}

// armTick keeps one timer at the policy's next time-driven change.
func (s *Supervisor) armTick() {
	if s.tickAt != nil {
		s.tickAt.Stop()
		s.tickAt = nil
	}
	if next := s.tracker.NextTick(); !next.IsZero() {
		s.tickAt = time.AfterFunc(time.Until(next), func() {
			s.post(func() {
				s.emit(s.tracker.Tick(time.Now()))
				s.update(func(*Snapshot) {})
			})
		})
	}
}

func (s *Supervisor) restartDue() {
	s.restartAt = nil
	if s.run != nil || s.drain != nil || s.reload != nil || s.staging != nil || s.pending != nil {
		return
	}
	now := time.Now()
	pm, err := s.tracker.Restart(now)
	s.emit(pm.Events)
	var r *policy.Refusal
	switch {
	case errors.As(err, &r):
		s.update(func(p *Snapshot) { p.State, p.NextRestart = Failed, r.RetryAt })
		if !r.RetryAt.IsZero() {
			s.scheduleRestart(r.RetryAt)
		}
		return
	case err != nil:
		return
	}
	s.startEngine(false, s.startFailed)
}

// startFailed counts a restart that could not start an engine as a crash.
func (s *Supervisor) startFailed(err error) {
	if err != nil && !errors.Is(err, ErrBusy) {
		s.crashed(crash.StartFailure, safetext.Bound(err.Error()), nil, 0)
	}
}

// stageRef is the model the next engine loads (a reload's, an adopted
// engine's, else the configured one) and the digest it must have: the
// configured ModelDigest pins the configured model only.
func (s *Supervisor) stageRef() (ref, want string) {
	if s.current.Ref != "" && s.current.Ref != s.cfg.Model {
		return s.current.Ref, ""
	}
	return s.cfg.Model, s.cfg.ModelDigest
}

// startOp is an engine start whose model is being staged.
type startOp struct {
	candidate bool
	done      func(error)
}

// startEngine starts an engine: its model is staged before every start
// (cheap when the source is unchanged; a source changed since it was
// staged is hashed and staged again), off the loop, for hashing a big
// model takes minutes and the pool must keep answering. done hears, on
// the loop, whether the engine process runs.
func (s *Supervisor) startEngine(candidate bool, done func(error)) {
	s.update(func(p *Snapshot) { p.State, p.NextRestart, p.HealthFailures = Starting, time.Time{}, nil })
	op := &startOp{candidate: candidate, done: done}
	s.staging = op
	ref, want := s.stageRef()
	stopped := s.stopping
	go func() {
		if stopped != nil {
			<-stopped
		}
		st, err := s.cfg.Stager.Stage(ref, want)
		s.post(func() { s.staged(op, st, err) })
	}()
}

// staged goes on with a start once its model is staged, unless a drain
// called the start off meanwhile.
func (s *Supervisor) staged(op *startOp, st model.Staged, err error) {
	if s.staging != op {
		return
	}
	s.staging = nil
	if err != nil {
		s.update(func(p *Snapshot) { p.State, p.LastError = Failed, safetext.Bound(err.Error()) })
		op.done(err)
		return
	}
	s.current = st
	op.done(s.launch(op.candidate))
}

// cancelStart calls off a start whose model is still being staged.
func (s *Supervisor) cancelStart(why string) {
	if op := s.staging; op != nil {
		s.staging = nil
		op.done(fmt.Errorf("start of pool %s called off: %s: %w", s.cfg.Pool, why, ErrBusy))
	}
}

// launch starts the engine on the staged s.current.
func (s *Supervisor) launch(candidate bool) error {
	st := s.current
	if len(s.cfg.VersionCommand) > 0 {
		// Asked beside the start, not before it: a version command that
		// initialises a GPU runtime takes seconds, and the pool's loop
		// must keep answering meanwhile.
		go func() {
			v, err := engineVersion(s.cfg.VersionCommand)
			s.post(func() { s.versionKnown(v, err) })
		}()
	}
	spec := s.cfg.Build(st.Path)
	started := time.Now()
	spec.Note, _ = json.Marshal(startNote{Model: st.Ref, Digest: st.Digest, StagedPath: st.Path, Candidate: candidate, StartedAt: started})
	for _, n := range spec.DeviceNodes {
		if _, err := os.Stat(n); err != nil {
			err = fmt.Errorf("GPU device node %s is missing (is the NVIDIA driver loaded?): %w", n, err)
			s.update(func(p *Snapshot) { p.State, p.LastError = Failed, safetext.Bound(err.Error()) })
			return err
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	startCtx, stop := context.WithTimeout(ctx, 30*time.Second)
	t0 := time.Now()
	e, err := s.rt.Start(startCtx, spec)
	stop()
	if err == nil {
		// How long from the decision to start to an engine running in its
		// scope: the restart overhead make bench reports.
		s.log.Info("engine process started", journal.PoolID, s.cfg.Pool, "START_USEC", time.Since(t0).Microseconds(), journal.Unit, e.Unit)
	}
	if err != nil {
		cancel()
		s.update(func(p *Snapshot) { p.State, p.LastError = Failed, safetext.Bound(err.Error()) })
		return err
	}
	r := &run{e: e, ctx: ctx, cancel: cancel, started: time.Now(), staged: st, candidate: candidate, exited: make(chan struct{})}
	s.run = r
	s.update(func(p *Snapshot) {
		p.Live, p.MainPID, p.Starts = true, e.PID, p.Starts+1
		p.ModelDigest, p.StagedPath = st.Digest, st.Path
	})
	go func() {
		for ev := range e.Events() {
			s.post(func() { s.engineEvent(r, ev) })
		}
	}()
	go s.probe(r)
	return nil
}

// versionKnown records what VersionCommand said; a record written before
// it came is written again.
func (s *Supervisor) versionKnown(v string, err error) {
	if err != nil {
		s.log.Warn("VersionCommand failed", journal.PoolID, s.cfg.Pool, journal.Error, safetext.Bound(err.Error()))
		return
	}
	// A version command's output is the engine's text.
	if v = safetext.Bound(v); v == s.snap.EngineVersion {
		return
	}
	s.update(func(p *Snapshot) { p.EngineVersion = v })
	if r := s.run; r != nil && r.healthy && r.stopping == "" {
		s.writeRecord(r)
	}
}

// engineVersion runs the version command: "version: X" in its output (as
// llama-server prints it) or else its first line is the version.
func engineVersion(argv []string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("%s: %w", strings.Join(argv, " "), err)
	}
	first := ""
	for _, l := range strings.Split(string(out), "\n") {
		l = strings.TrimSpace(l)
		if v, ok := strings.CutPrefix(l, "version: "); ok {
			return v, nil
		}
		if first == "" {
			first = l
		}
	}
	if first == "" {
		return "", fmt.Errorf("%s printed nothing", strings.Join(argv, " "))
	}
	return first, nil
}

// probe checks health: often until the engine first answers (bounded by
// StartTimeout), then every Interval; it reports each result to the loop.
// probeEpoch aligns the probes of healthy engines: they fall on multiples
// of their interval from this one instant, so a daemon running many pools
// wakes once per interval for all of them, not once per pool (as systemd
// coalesces timers). On a VM the wake-ups cost more than the probes: for
// 64 pools this is several times less idle CPU.
var probeEpoch = time.Now()

// untilProbe is how long from now to the next aligned probe, in (0, every].
func untilProbe(now time.Time, every time.Duration) time.Duration {
	return every - now.Sub(probeEpoch)%every
}

func (s *Supervisor) probe(r *run) {
	h := s.cfg.Health
	startEvery := min(h.Interval, 100*time.Millisecond)
	deadline := time.Now().Add(h.StartTimeout)
	if !r.startBy.IsZero() {
		deadline = r.startBy
	}
	healthy := false
	for {
		wait := startEvery
		if healthy {
			wait = untilProbe(time.Now(), h.Interval)
		}
		select {
		case <-r.ctx.Done():
			return
		case <-time.After(wait):
		}
		// Until it is healthy (and again after a failed probe) an
		// answer counts only from a socket of the engine's own scope:
		// while the engine is down or loading, another user may listen
		// on its port.
		pctx := r.ctx
		if !healthy || r.failing.Load() {
			pctx = health.WithVerify(r.ctx, s.ownedByScope(r))
		}
		err := s.prober.Probe(pctx)
		if r.ctx.Err() != nil {
			return
		}
		var foreign *sockdiag.ForeignError
		if errors.As(err, &foreign) && !r.squatted.Swap(true) {
			s.post(func() { s.squatterSeen(r, foreign) })
		}
		now := time.Now()
		if !healthy {
			if err == nil {
				healthy = true
				s.post(func() { s.becameHealthy(r, now) })
			} else if now.After(deadline) {
				s.post(func() { s.startTimedOut(r, err) })
				return
			}
			continue
		}
		s.post(func() { s.probed(r, now, err) })
	}
}

// ownedByScope verifies that a probe's peer is a socket of the engine's
// scope. The scope's cgroup is found from the engine's process once per
// run.
func (s *Supervisor) ownedByScope(r *run) health.Verify {
	return func(peer netip.AddrPort) error {
		r.scopeOnce.Do(func() {
			id, err := sockdiag.CgroupID(r.e.PID)
			if err != nil && !errors.Is(err, sockdiag.ErrNoCgroup2) {
				r.scopeErr = fmt.Errorf("finding the engine's cgroup: %w", err)
				return
			}
			var st syscall.Stat_t
			if err := syscall.Stat(fmt.Sprintf("/proc/%d", r.e.PID), &st); err != nil {
				r.scopeErr = fmt.Errorf("finding the engine's user: %w", err)
				return
			}
			r.scope = sockdiag.Scope{Unit: r.e.Unit, CgroupID: id, UID: st.Uid}
		})
		if r.scopeErr != nil {
			return r.scopeErr
		}
		_, err := sockdiag.CheckOwner(peer.Addr(), peer.Port(), r.scope)
		return err
	}
}

// squatterSeen says, once per run, that another process answers on the
// engine's port: the pool is not Ready while it does.
func (s *Supervisor) squatterSeen(r *run, err *sockdiag.ForeignError) {
	if s.run != r {
		return
	}
	msg := safetext.Bound("not ready: " + err.Error())
	s.log.Warn("engine's port held by a process outside its scope", journal.PoolID, s.cfg.Pool, journal.Error, err.Error())
	s.update(func(p *Snapshot) { p.LastError = msg })
}

func (s *Supervisor) becameHealthy(r *run, now time.Time) {
	if s.run != r || r.stopping != "" {
		return
	}
	r.healthy = true
	if r.candidate {
		s.reloadCandidateHealthy(r)
		return
	}
	s.emit(s.tracker.Healthy(now))
	s.update(func(p *Snapshot) {
		// LastError stays: it is the last error, not the current one.
		p.State, p.Ready, p.ReadyAt, p.LastHeartbeat = Ready, true, now, now
	})
	s.writeRecord(r)
	s.log.Info("engine ready", journal.PoolID, s.cfg.Pool, journal.EngineVersion, s.snap.EngineVersion,
		journal.Model, s.snap.Model, journal.DeviceMask, s.cfg.DeviceMask, "STARTUP_SEC", now.Sub(r.started).Seconds())
}

func (s *Supervisor) startTimedOut(r *run, err error) {
	if s.run != r || r.stopping != "" {
		return
	}
	r.lastProbe = fmt.Errorf("not healthy within StartTimeoutSec=%s: %w", s.cfg.Health.StartTimeout, err)
	s.stopRun("start")
}

func (s *Supervisor) probed(r *run, now time.Time, err error) {
	if s.run != r || r.stopping != "" {
		return
	}
	r.failing.Store(err != nil)
	if err == nil {
		if len(r.failures) > 0 {
			r.failures = nil
			s.update(func(p *Snapshot) { p.HealthFailures, p.LastHeartbeat = nil, now })
			return
		}
		// A heartbeat alone wakes nobody: it is read, not watched.
		s.mu.Lock()
		s.snap.LastHeartbeat = now
		s.mu.Unlock()
		return
	}
	r.failures = append(r.failures, now)
	r.lastProbe = err
	s.metrics.HealthCheckFailures.WithLabelValues(s.cfg.Pool).Inc()
	fails := append([]time.Time(nil), r.failures...)
	s.update(func(p *Snapshot) { p.HealthFailures = fails })
	s.log.Warn("health probe failed", journal.PoolID, s.cfg.Pool, journal.FailureCount, len(fails), journal.Error, safetext.Bound(err.Error()))
	if len(r.failures) >= s.cfg.Health.FailureThreshold {
		s.stopRun("health")
	}
}

// XID reports an NVML critical XID event on one of the pool's GPUs: the
// engine cannot be trusted any more and is restarted.
func (s *Supervisor) XID(uuid string, xid uint64) {
	s.post(func() {
		r := s.run
		if r == nil || r.stopping != "" {
			return
		}
		r.fault, r.xid = fmt.Sprintf("NVML: Xid %d on %s", xid, uuid), true
		s.log.Error("GPU XID event", journal.PoolID, s.cfg.Pool, "XID", xid, "GPU", uuid)
		s.stopRun("fault")
	})
}

// stopRun stops the current engine in the background; its exit arrives as
// an event like any other.
func (s *Supervisor) stopRun(why string) {
	r := s.run
	if r == nil || r.stopping != "" {
		return
	}
	r.stopping = why
	r.cancel()
	s.update(func(p *Snapshot) { p.Ready = false })
	s.stopScope(r)
}

// stopScope stops the engine's scope in the background. The next start
// waits for it: a stop by name must not reach the next engine's scope.
func (s *Supervisor) stopScope(r *run) {
	stopTimeout := s.cfg.Build(r.staged.Path).StopTimeout
	done := make(chan struct{})
	s.stopping = done
	go func() {
		defer close(done)
		ctx, cancel := context.WithTimeout(context.Background(), stopTimeout+30*time.Second)
		defer cancel()
		if err := s.rt.Stop(ctx, s.cfg.Pool); err != nil {
			s.log.Error("stopping engine", journal.PoolID, s.cfg.Pool, journal.Error, err.Error())
		}
	}()
}

func (s *Supervisor) engineEvent(r *run, ev engine.Event) {
	if s.run != r {
		return
	}
	if ev.Fault != "" {
		r.fault = ev.Fault
		s.log.Error("GPU fault in engine output", journal.PoolID, s.cfg.Pool, "LINE", safetext.Bound(ev.Fault))
		s.stopRun("fault")
		return
	}
	x := ev.Exit
	if x == nil {
		return
	}
	// Not live, not ready: said first, before any file is touched.
	s.update(func(p *Snapshot) { p.Live, p.Ready, p.MainPID = false, false, 0 })
	s.run = nil
	r.cancel()
	close(r.exited)
	if x.Lost {
		// Without its shim nothing reports on the engine any more (and a
		// garbled report may come from an engine that still runs): the
		// scope goes before anything else happens on its GPUs.
		s.log.Error("engine's shim lost: stopping its scope", journal.PoolID, s.cfg.Pool, journal.Error, x.LostWhy)
		s.stopScope(r)
	}
	uptime := x.At.Sub(r.started)
	s.removeRecord()

	switch {
	case r.candidate:
		s.reloadCandidateExited(r, x)
		return
	case r.stopping == "drain" || r.stopping == "reload":
		s.engineStopped(r)
		return
	}
	if r.stopping == stopOperator {
		s.operatorStopped(r)
		return
	}
	if s.rt != nil && s.rt.Witness != nil && r.stopping == "" && mayBeStopped(x) {
		// An exit like this may be an operator's systemctl stop, which
		// systemd tells a few milliseconds after the scope empties: its
		// word decides, or holdExit without it.
		p := &pendingExit{r: r, x: x, uptime: uptime}
		p.timer = time.AfterFunc(holdExit, func() {
			s.post(func() {
				if s.pending == p {
					s.settleExit(witness.NoCause)
				}
			})
		})
		s.pending = p
		return
	}
	s.exited(r, x, uptime)
}

// stopOperator is run.stopping for a stop systemd reports and the daemon
// did not ask for.
const stopOperator = "operator"

// holdExit bounds how long an exit that may be an operator's stop waits
// for systemd's word.
const holdExit = 500 * time.Millisecond

// pendingExit is an exit waiting for systemd's word on it.
type pendingExit struct {
	r      *run
	x      *engine.Exit
	uptime time.Duration
	timer  *time.Timer
}

// mayBeStopped says whether an exit looks like what a stop of the scope
// does to an engine: SIGTERM, SIGKILL, a graceful exit (status 0), or the
// shim gone with it.
func mayBeStopped(x *engine.Exit) bool {
	if x.Lost || (x.Status.Exited() && x.Status.ExitStatus() == 0) {
		return true
	}
	return x.Status.Signaled() && (x.Status.Signal() == syscall.SIGTERM || x.Status.Signal() == syscall.SIGKILL)
}

// unitEvent is systemd's word on the engine's scope.
func (s *Supervisor) unitEvent(ev witness.Event) {
	switch {
	case ev.Cause == witness.OperatorStop && (ev.Kind == witness.Stopping || ev.Kind == witness.Dead):
		if r := s.run; r != nil && r.stopping == "" && !r.candidate {
			r.stopping = stopOperator
			r.cancel()
			s.update(func(p *Snapshot) { p.Ready = false })
		} else if s.pending != nil {
			s.settleExit(witness.OperatorStop)
		}
	case ev.Kind == witness.Dead && s.pending != nil:
		s.settleExit(ev.Cause)
	}
}

// settleExit classifies a held exit with what systemd said of it.
func (s *Supervisor) settleExit(cause witness.Cause) {
	p := s.pending
	s.pending = nil
	p.timer.Stop()
	switch cause {
	case witness.OperatorStop:
		s.operatorStopped(p.r)
	case witness.OOMKilled:
		s.crashed(crash.OutOfMemory, "out of memory: systemd reports the scope's Result=oom-kill; "+describe("", p.r, p.x), p.x, p.uptime)
		s.engineStopped(p.r)
	default:
		s.exited(p.r, p.x, p.uptime)
	}
}

// operatorStopped honours a stop of the scope that the daemon did not ask
// for, as systemd honours one: stopped, not restarted, no crash.
func (s *Supervisor) operatorStopped(r *run) {
	s.log.Warn("engine's scope stopped by an operator (systemctl stop): not restarted until Start", journal.PoolID, s.cfg.Pool,
		journal.Unit, r.e.Unit)
	s.emit(s.tracker.Stopped(time.Now()))
	s.revokeLeases("the engine's scope was stopped")
	s.update(func(p *Snapshot) { p.State, p.LastError = Stopped, "stopped by an operator: systemctl stop "+r.e.Unit })
	s.engineStopped(r)
}

// exited handles an exit nobody asked for: status 0 is a graceful end,
// anything else a crash.
func (s *Supervisor) exited(r *run, x *engine.Exit, uptime time.Duration) {
	reason, ok := classify(r, x)
	if !ok {
		s.log.Info("engine exited on its own with status 0: not restarted", journal.PoolID, s.cfg.Pool,
			journal.ExitCode, 0, journal.UptimeSec, int64(uptime.Seconds()))
		s.emit(s.tracker.Stopped(time.Now()))
		s.revokeLeases("the engine exited")
		s.update(func(p *Snapshot) { p.State, p.LastError = Stopped, "exited with status 0" })
		s.engineStopped(r)
		return
	}
	s.crashed(reason, describe(reason, r, x), x, uptime)
	s.engineStopped(r)
}

// crashed handles a crash: the pool is not live or ready, its leases are
// gone with its engine, and the policy decides when it restarts (unless a
// drain is under way: then it does not).
func (s *Supervisor) crashed(reason crash.Reason, msg string, x *engine.Exit, uptime time.Duration) {
	// It may quote the engine's output: valid UTF-8 and bounded before
	// it reaches the journal and the bus.
	msg = safetext.Bound(msg)
	now := time.Now()
	d := s.tracker.Crash(now, reason)
	st := s.tracker.Status(now)
	attrs := []any{
		journal.MessageIDField, string(journal.MsgCrash), journal.PoolID, s.cfg.Pool,
		journal.CrashReason, string(reason), journal.CrashCount, st.CrashCount, journal.RestartCount, st.RestartCount,
		journal.FailureStreak, st.Streak,
		journal.EngineVersion, s.snap.EngineVersion, journal.Model, s.snap.Model, journal.DeviceMask, s.cfg.DeviceMask,
	}
	if x != nil && x.Lost && x.ShimSignal != 0 {
		attrs = append(attrs, journal.ExitSignal, signalName(x.ShimSignal))
	}
	if x != nil && !x.Lost {
		if x.Status.Exited() {
			attrs = append(attrs, journal.ExitCode, x.Status.ExitStatus())
		} else if x.Status.Signaled() {
			attrs = append(attrs, journal.ExitSignal, signalName(x.Status.Signal()))
		}
	}
	if x != nil {
		attrs = append(attrs, journal.UptimeSec, int64(uptime.Seconds()))
	}
	level := slog.LevelError
	if reason == crash.OutOfMemory {
		attrs[1] = string(journal.MsgOOM)
		level = journal.LevelCritical
	}
	s.log.Log(context.Background(), level, "engine crashed: "+msg, attrs...)
	s.revokeLeases("the engine crashed")
	if s.drain != nil {
		// A draining pool is not restarted.
		s.emit(append(d.Events, s.tracker.Stopped(now)...))
		s.update(func(p *Snapshot) { p.LastError, p.LastReason = msg, reason })
		return
	}
	s.emit(d.Events)
	state := Backoff
	if s.held != "" {
		d.Held, d.At = true, time.Time{}
	}
	if d.Held {
		state = Failed
	}
	s.update(func(p *Snapshot) {
		p.State, p.LastError, p.LastReason, p.NextRestart = state, msg, reason, d.At
		p.Live, p.Ready = false, false
	})
	if !d.At.IsZero() {
		s.scheduleRestart(d.At)
	}
}
