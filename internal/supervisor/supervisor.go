// Package supervisor owns one pool: it is the only place the pool's state
// changes. The engine's shim, the health prober and timers report to its
// loop; it asks the restart policy what to do about a crash and does it.
package supervisor

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/llorch/pool-managerd/internal/breaker"
	"github.com/llorch/pool-managerd/internal/crash"
	"github.com/llorch/pool-managerd/internal/engine"
	"github.com/llorch/pool-managerd/internal/health"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/metrics"
	"github.com/llorch/pool-managerd/internal/policy"
)

// Pool states.
const (
	Stopped  = "stopped"
	Starting = "starting"
	Ready    = "ready"
	Backoff  = "backoff"
	Failed   = "failed"
	Stopping = "stopping"
)

// Config is what a supervisor needs to know about its pool.
type Config struct {
	Pool          string
	Spec          engine.Spec
	HealthURL     string
	Health        HealthConfig
	Restart       policy.Params
	Model         string
	EngineVersion string
	DeviceMask    string
}

// HealthConfig is the pool's [Health] section.
type HealthConfig struct {
	Interval, Timeout, StartTimeout time.Duration
	FailureThreshold                int
}

// Snapshot is the pool's state at one moment.
type Snapshot struct {
	ID           string
	State        string
	Live, Ready  bool
	LastError    string
	LastReason   crash.Reason
	CrashCount   uint64
	RestartCount uint64
	BreakerState string
	// NextRestart is when a pending restart is due (zero if none).
	NextRestart   time.Time
	Unit          string
	MainPID       int
	Model         string
	EngineVersion string
	DeviceMask    string
	// HealthFailures are the times of the current run of failed probes.
	HealthFailures []time.Time
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
	run         *run
	restartAt   *time.Timer
	tickAt      *time.Timer
	stopWaiters []chan error
}

// run is one engine process's life.
type run struct {
	e       *engine.Engine
	ctx     context.Context
	cancel  context.CancelFunc
	started time.Time
	healthy bool
	// why the manager is stopping it, if it is: "" (not stopping),
	// "request", "health", "fault".
	stopping string
	fault    string
	// xid is set when the fault came from NVML, not the engine's output.
	xid       bool
	failures  []time.Time
	lastProbe error
}

// New creates the supervisor; Run starts it.
func New(cfg Config, rt *engine.Runtime, log *slog.Logger, m *metrics.Set) *Supervisor {
	s := &Supervisor{
		cfg: cfg, rt: rt, log: log, metrics: m,
		tracker: policy.New(cfg.Restart, rand.Float64),
		prober:  health.New(cfg.HealthURL, cfg.Health.Timeout),
		events:  make(chan func(), 16),
		changed: make(chan struct{}),
	}
	s.snap = Snapshot{ID: cfg.Pool, State: Stopped, BreakerState: breaker.Closed.String(), Unit: engine.UnitName(cfg.Pool),
		Model: cfg.Model, EngineVersion: cfg.EngineVersion, DeviceMask: cfg.DeviceMask}
	return s
}

// Run is the pool's owner loop; it returns when ctx ends, leaving the
// engine running (engines outlive the daemon).
func (s *Supervisor) Run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case f := <-s.events:
			f()
		}
	}
}

// post runs f on the loop.
func (s *Supervisor) post(f func()) { s.events <- f }

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

func (s *Supervisor) update(f func(*Snapshot)) {
	s.mu.Lock()
	f(&s.snap)
	st := s.tracker.Status(time.Now())
	s.snap.CrashCount, s.snap.RestartCount = st.CrashCount, st.RestartCount
	s.snap.BreakerState = st.Breaker.String()
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
	s.metrics.PoolReady.WithLabelValues(snap.ID).Set(b(snap.Ready))
	s.metrics.PoolLive.WithLabelValues(snap.ID).Set(b(snap.Live))
}

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
	s.armTick()
}

// Start starts the engine of a stopped or failed pool.
func (s *Supervisor) Start() error {
	errc := make(chan error, 1)
	s.post(func() {
		if s.run != nil {
			errc <- fmt.Errorf("pool %s is %s", s.cfg.Pool, s.Snapshot().State)
			return
		}
		s.cancelRestart()
		errc <- s.startEngine()
	})
	return <-errc
}

// Stop stops the engine (SIGTERM, then SIGKILL after the stop timeout) and
// cancels any pending restart; it returns when the engine is gone.
func (s *Supervisor) Stop(ctx context.Context) error {
	errc := make(chan error, 1)
	s.post(func() {
		s.cancelRestart()
		s.emit(s.tracker.Stopped(time.Now()))
		if s.run == nil {
			s.update(func(p *Snapshot) { p.State, p.NextRestart = Stopped, time.Time{} })
			errc <- nil
			return
		}
		s.stopWaiters = append(s.stopWaiters, errc)
		s.stopRun("request")
	})
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// ResetBreaker closes the pool's breakers; a held restart happens now.
func (s *Supervisor) ResetBreaker() {
	s.post(func() {
		now := time.Now()
		s.emit(s.tracker.ResetBreaker(now))
		if s.tracker.Status(now).Pending {
			s.scheduleRestart(now)
		}
		s.update(func(*Snapshot) {})
	})
}

// AllowRestart lets a held restart happen once, now.
func (s *Supervisor) AllowRestart() error {
	errc := make(chan error, 1)
	s.post(func() {
		ev, err := s.tracker.AllowRestart(time.Now())
		s.emit(ev)
		if err == nil {
			s.scheduleRestart(time.Now())
		}
		errc <- err
	})
	return <-errc
}

func (s *Supervisor) cancelRestart() {
	if s.restartAt != nil {
		s.restartAt.Stop()
		s.restartAt = nil
	}
}

func (s *Supervisor) scheduleRestart(at time.Time) {
	s.cancelRestart()
	s.restartAt = time.AfterFunc(time.Until(at), func() { s.post(s.restartDue) })
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
	if s.run != nil {
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
	if err := s.startEngine(); err != nil {
		s.crashed(crash.StartFailure, err.Error(), nil, 0)
	}
}

func (s *Supervisor) startEngine() error {
	s.update(func(p *Snapshot) { p.State, p.NextRestart, p.HealthFailures = Starting, time.Time{}, nil })
	ctx, cancel := context.WithCancel(context.Background())
	startCtx, stop := context.WithTimeout(ctx, 30*time.Second)
	e, err := s.rt.Start(startCtx, s.cfg.Spec)
	stop()
	if err != nil {
		cancel()
		s.update(func(p *Snapshot) { p.State, p.LastError = Failed, err.Error() })
		return err
	}
	r := &run{e: e, ctx: ctx, cancel: cancel, started: time.Now()}
	s.run = r
	s.update(func(p *Snapshot) { p.Live, p.MainPID, p.Starts = true, e.PID, p.Starts+1 })
	go func() {
		for ev := range e.Events() {
			s.post(func() { s.engineEvent(r, ev) })
		}
	}()
	go s.probe(r)
	return nil
}

// probe checks health: often until the engine first answers (bounded by
// StartTimeout), then every Interval; it reports each result to the loop.
func (s *Supervisor) probe(r *run) {
	h := s.cfg.Health
	startEvery := min(h.Interval, 250*time.Millisecond)
	deadline := time.Now().Add(h.StartTimeout)
	healthy := false
	for {
		every := h.Interval
		if !healthy {
			every = startEvery
		}
		select {
		case <-r.ctx.Done():
			return
		case <-time.After(every):
		}
		err := s.prober.Probe(r.ctx)
		if r.ctx.Err() != nil {
			return
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

func (s *Supervisor) becameHealthy(r *run, now time.Time) {
	if s.run != r || r.stopping != "" {
		return
	}
	r.healthy = true
	s.emit(s.tracker.Healthy(now))
	s.update(func(p *Snapshot) { p.State, p.Ready, p.LastError, p.ReadyAt = Ready, true, "", now })
	s.log.Info("engine ready", journal.PoolID, s.cfg.Pool, journal.EngineVersion, s.cfg.EngineVersion,
		journal.Model, s.cfg.Model, journal.DeviceMask, s.cfg.DeviceMask, "STARTUP_SEC", now.Sub(r.started).Seconds())
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
	if err == nil {
		if len(r.failures) > 0 {
			r.failures = nil
			s.update(func(p *Snapshot) { p.HealthFailures = nil })
		}
		return
	}
	r.failures = append(r.failures, now)
	r.lastProbe = err
	s.metrics.HealthCheckFailures.WithLabelValues(s.cfg.Pool).Inc()
	fails := append([]time.Time(nil), r.failures...)
	s.update(func(p *Snapshot) { p.HealthFailures = fails })
	s.log.Warn("health probe failed", journal.PoolID, s.cfg.Pool, journal.FailureCount, len(fails), "ERROR", err.Error())
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
	if r.stopping != "" {
		return
	}
	r.stopping = why
	r.cancel()
	s.update(func(p *Snapshot) {
		p.Ready = false
		if why == "request" {
			p.State = Stopping
		}
	})
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), s.cfg.Spec.StopTimeout+30*time.Second)
		defer cancel()
		if err := s.rt.Stop(ctx, s.cfg.Pool); err != nil {
			s.log.Error("stopping engine", journal.PoolID, s.cfg.Pool, "ERROR", err.Error())
		}
	}()
}

func (s *Supervisor) engineEvent(r *run, ev engine.Event) {
	if s.run != r {
		return
	}
	if ev.Fault != "" {
		r.fault = ev.Fault
		s.log.Error("GPU fault in engine output", journal.PoolID, s.cfg.Pool, "LINE", ev.Fault)
		s.stopRun("fault")
		return
	}
	x := ev.Exit
	if x == nil {
		return
	}
	s.run = nil
	r.cancel()
	uptime := x.At.Sub(r.started)
	s.update(func(p *Snapshot) { p.Live, p.Ready, p.MainPID = false, false, 0 })

	if r.stopping == "request" {
		s.update(func(p *Snapshot) { p.State = Stopped })
		for _, w := range s.stopWaiters {
			w <- nil
		}
		s.stopWaiters = nil
		return
	}
	reason, ok := classify(r, x)
	if !ok {
		s.log.Info("engine exited on its own with status 0: not restarted", journal.PoolID, s.cfg.Pool,
			journal.ExitCode, 0, journal.UptimeSec, int64(uptime.Seconds()))
		s.emit(s.tracker.Stopped(time.Now()))
		s.update(func(p *Snapshot) { p.State, p.LastError = Stopped, "exited with status 0" })
		return
	}
	s.crashed(reason, describe(reason, r, x), x, uptime)
}

// classify adds to crash.Classify what only the supervisor knows: that it
// killed the engine for failing its probes or its start.
func classify(r *run, x *engine.Exit) (crash.Reason, bool) {
	if x.Lost {
		return crash.Signal, true
	}
	reason, ok := crash.Classify(crash.Exit{Status: x.Status, OOMKilled: x.OOMKills > 0, CUDAFault: r.fault != ""})
	switch r.stopping {
	case "health":
		if reason != crash.OutOfMemory && reason != crash.CUDAError {
			return crash.HealthCheck, true
		}
	case "start":
		return crash.StartFailure, true
	case "fault":
		if r.xid {
			return crash.DriverXID, true
		}
		return crash.CUDAError, true
	}
	return reason, ok
}

func signalName(sig syscall.Signal) string {
	if n := unix.SignalName(sig); n != "" {
		return n
	}
	return fmt.Sprintf("signal %d", int(sig))
}

func describe(reason crash.Reason, r *run, x *engine.Exit) string {
	ws := x.Status
	how := ""
	switch {
	case x.Lost:
		how = "engine scope killed before its exit was seen"
	case ws.Exited():
		how = fmt.Sprintf("exited with status %d", ws.ExitStatus())
	case ws.Signaled():
		how = "killed by " + signalName(ws.Signal())
		if ws.CoreDump() {
			how += " (core dumped)"
		}
	}
	switch reason {
	case crash.OutOfMemory:
		return fmt.Sprintf("out of memory: %s, %d OOM kill(s) in the scope", how, x.OOMKills)
	case crash.CUDAError, crash.DriverXID:
		return fmt.Sprintf("GPU fault: %q; %s", r.fault, how)
	case crash.HealthCheck:
		return fmt.Sprintf("health check failed %d times (%v); %s", len(r.failures), r.lastProbe, how)
	case crash.StartFailure:
		return fmt.Sprintf("%v; %s", r.lastProbe, how)
	}
	return how
}

// crashed handles a crash: the pool is not live or ready, the policy
// decides when it restarts.
func (s *Supervisor) crashed(reason crash.Reason, msg string, x *engine.Exit, uptime time.Duration) {
	now := time.Now()
	d := s.tracker.Crash(now, reason)
	st := s.tracker.Status(now)
	attrs := []any{
		journal.MessageIDField, string(journal.MsgCrash), journal.PoolID, s.cfg.Pool,
		journal.CrashReason, string(reason), journal.CrashCount, st.CrashCount, journal.RestartCount, st.RestartCount,
		journal.EngineVersion, s.cfg.EngineVersion, journal.Model, s.cfg.Model, journal.DeviceMask, s.cfg.DeviceMask,
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
	s.emit(d.Events)
	state := Backoff
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
