package lifecycle

import (
	"cmp"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/llorch/pool-managerd/internal/crash"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/model"
	"github.com/llorch/pool-managerd/internal/policy"
	"github.com/llorch/pool-managerd/internal/safetext"
	"github.com/llorch/pool-managerd/internal/witness"
)

// Config is what the machine knows of its pool.
type Config struct {
	Pool string
	// Unit is the engine's scope.
	Unit string
	// Model is the configured ref, ModelDigest its pinned digest ("": any).
	Model, ModelDigest string
	EngineVersion      string
	DeviceMask         string
	// Slots caps the leases (0: no cap).
	Slots            uint32
	FailureThreshold int
	// Witness: systemd's word on the scope is heard, so an exit that may
	// be a stop of the scope waits HoldExit for it.
	Witness  bool
	HoldExit time.Duration
	// Warmup: a healthy engine is warmed up before it is Ready.
	Warmup bool
	// Stall: requests in flight with no token for this long is a stall
	// (0: not watched).
	Stall time.Duration
	// DrainRequests: the engine's metrics tell its own requests in
	// flight (ProgressURL=), and a drain waits for them, within its
	// deadline, before it stops the engine: requests that hold no lease
	// are not cut (and llama-server, which ignores SIGTERM while it
	// serves one, is not killed).
	DrainRequests bool
	// GPURetry, PortRetry and MemoryRetry override the package's (0:
	// keep it).
	GPURetry, PortRetry, MemoryRetry time.Duration
	// Ahead is how long before a scheduled restart its engine's scope is
	// prepared at least (0: not): systemd's part of the restart is then
	// done during the backoff. Spread, when set, draws a number in [0, 1)
	// that stretches the lead up to 4 Ahead, so that pools crashed
	// together prepare apart.
	Ahead  time.Duration
	Spread func() float64
	// IdleStop: a Ready pool with no lease and no request in flight for
	// this long goes Idle, its engine stopped (0: never; Pin=).
	IdleStop time.Duration
	// StartOnLease: a lease asked of an Idle pool starts it and is
	// granted once it is Ready.
	StartOnLease bool
	// Sleep: idleness puts the engine to sleep at SleepLevel instead of
	// stopping it (vLLM's sleep mode); waking it is a request, not a
	// start.
	Sleep      bool
	SleepLevel int
	// WakeTimeout bounds the wait of a lease that starts the pool, and of
	// an EnsureReady with no timeout of its own (0: DefaultWakeTimeout).
	WakeTimeout time.Duration
}

// View is the part of the pool's published state the machine owns (the
// supervisor's Snapshot adds what only it knows).
type View struct {
	State        State
	Live, Ready  bool
	Draining     bool
	ActiveLeases uint32
	LastError    string
	LastReason   crash.Reason
	// NextRestart is when a pending restart is due (zero if none).
	NextRestart time.Time
	MainPID     int
	// Model is the ref the pool runs (as configured or last reloaded),
	// ModelDigest the digest of what the engine loaded, StagedPath the
	// file it loaded.
	Model, ModelDigest string
	StagedPath         string
	EngineVersion      string
	// HealthFailures are the times of the current run of failed probes.
	HealthFailures []time.Time
	// LastHeartbeat is the last successful health probe.
	LastHeartbeat time.Time
	// ReadyAt is when the current engine became ready.
	ReadyAt time.Time
	// Starts counts engine starts, restarts included.
	Starts int
	// Policy holds the crash and restart counts and the breakers. Its
	// Streak is the run of crashes the backoff counts: unlike CrashCount
	// it starts over after a stable run or ResetBreaker.
	Policy policy.Status
	Held   string
	// Operation is the long operation under way ("" if none).
	Operation string
	// Progress is how far Operation has come: 0..1, -1 when unknown.
	Progress float64
	// IdleSince is when the pool went Idle (zero when it is not).
	IdleSince time.Time
}

// run is one engine process's life as the machine sees it.
type run struct {
	id        RunID
	pid       int
	started   time.Time
	staged    model.Staged
	healthy   bool
	warm      bool
	stopping  StopReason
	candidate bool
	fault     string
	xid       bool
	failures  []time.Time
	lastProbe string
	// canaryFailures are the current run of failed canaries; byCanary:
	// they stopped it.
	canaryFailures []time.Time
	byCanary       bool
	// invocation is its scope's InvocationID, once systemd told it.
	invocation string
	// dead: the kernel said the process ended (Died); its exit is not
	// known yet.
	dead bool
	// Progress: the token count last seen, since when the engine has
	// been idle or producing none; progressBad once an unreadable metrics
	// endpoint was reported.
	tokens      float64
	movedAt     time.Time
	inFlight    float64
	progressBad bool
	// busy: the engine's metrics last said requests are in flight, or
	// could not say (an idle stop must not cut them).
	busy bool
	// sleep: where it stands with Sleep= (sleep.go).
	sleep sleepState
	// onDemand: its start was an idle pool's, for its callers.
	onDemand bool
}

// startOp is an engine start between its decision and its process.
type startOp struct {
	phase     startPhase
	run       RunID
	candidate bool
	// req is the Start request it answers (0: none, a restart).
	req ReqID
	// staged is its model, once staged (startLaunching).
	staged model.Staged
	// onDemand: the start of an idle (or sleeping) pool for its callers:
	// held by what another process holds, the pool is idle again.
	onDemand bool
}

// pendingExit is an exit waiting for systemd's word on it.
type pendingExit struct {
	r      *run
	x      Exit
	uptime time.Duration
}

// stagingFrac is how far staging has come, for View.Progress.
type stagingFrac struct {
	// stage: the model being staged is hashed this far (-1: not known).
	stage float64
	// hashing: a reload's model is hashed (hash of it) before the
	// reload is asked of the machine.
	hashing bool
	hash    float64
}

// timers are the machine's timers: each one's generation (a firing of
// an earlier one is ignored) and whether it is armed.
type timers struct {
	gen   [numTimers]uint64
	armed [numTimers]bool
}

// preparedScope is a scheduled restart's scope, made ahead of it: a
// Prepare is out (inv is its InvocationID, once known).
type preparedScope struct{ inv string }

// Machine is one pool's lifecycle. It is not safe for concurrent use: the
// supervisor's loop owns it.
type Machine struct {
	cfg Config
	tr  *policy.Tracker
	// state changes only through transition.
	state State

	// What the View shows besides the state.
	held, lastErr                string
	reason                       crash.Reason
	next                         time.Time
	model, digest, path, version string
	live                         bool
	pid, starts                  int
	healthFailures               []time.Time
	heartbeat, readyAt           time.Time

	// The engine (runs: the last RunID given), and the operations under
	// way on the pool (nil: none).
	run      *run
	runs     RunID
	start    *startOp
	drain    *drainOp
	reload   *reloadOp
	rollback *rollbackWait
	// pending is an exit held for systemd's word.
	pending *pendingExit
	// unitEnded: systemd said the scope ended (unitCause why) before the
	// shim reported the exit.
	unitEnded bool
	unitCause witness.Cause
	prepared  *preparedScope
	frac      stagingFrac
	// scopeStops: runs whose scope's stop (StopScope) is out.
	scopeStops map[RunID]bool
	// current is the model the running (or next) engine loads.
	current model.Staged
	leases  map[string]string
	// owned counts the leases of each owner.
	owned map[string]int
	// gpuHeld: GPUs that need a reset, with why.
	gpuHeld map[string]string
	timers  timers
	// idleSince is when the pool went Idle; waiters wait for it to be
	// Ready (a lease or EnsureReady); waking: a start made for them is
	// under way.
	idleSince time.Time
	waiters   []waiter
	waking    bool
	// parking: the drain being requested is a park (ParkRequested);
	// sleepParks are parks of a sleeping pool waiting for its engine's
	// answer to the Sleep.
	parking    bool
	sleepParks []ReqID
	// noMemory: the last start was refused for want of GPU memory.
	noMemory bool
	// recSleep is what the engine's runtime record says of sleep, as
	// last written (or found, for an adopted engine).
	recSleep sleepRecord

	// The step under way.
	out       []Action
	published View
	now       time.Time
}

// New returns the machine of a stopped pool with policy tr (restored by
// the caller). held, when set, keeps it from starting until ResetBreaker
// (its persisted state could not be read).
func New(cfg Config, tr *policy.Tracker, held string) *Machine {
	m := &Machine{cfg: cfg, tr: tr, held: held, leases: map[string]string{}, scopeStops: map[RunID]bool{}, owned: map[string]int{}, gpuHeld: map[string]string{}, frac: stagingFrac{stage: -1},
		model: cfg.Model, version: cfg.EngineVersion}
	if held != "" {
		m.transition(Failed, "held from the start")
		m.lastErr = held
	}
	m.published = m.View(time.Time{})
	return m
}

// State is the pool's state now.
func (m *Machine) State() State { return m.state }

// Leases returns the leases held, id -> owner (the caller must not keep
// it past the loop's turn).
func (m *Machine) Leases() map[string]string { return m.leases }

// Policy is the pool's restart policy, for its status and persistence.
func (m *Machine) Policy() *policy.Tracker { return m.tr }

// RecordWritable says whether the runtime record may be written now (an
// engine runs healthy, serving, and no drain or reload is under way), and
// what it says.
func (m *Machine) RecordWritable() (WriteRecord, bool) {
	r := m.run
	if r == nil || !r.healthy || r.candidate || r.stopping != NotStopping || m.drain != nil {
		return WriteRecord{}, false
	}
	return m.recordOf(r, m.model), true
}

// View returns the published state at now.
func (m *Machine) View(now time.Time) View {
	st := m.tr.Status(now)
	v := View{
		State: m.state, Live: m.live, Ready: m.ready(),
		Draining: m.drain != nil, ActiveLeases: uint32(len(m.leases)), LastError: m.lastErr, LastReason: m.reason,
		NextRestart: m.next, MainPID: m.pid, Model: m.model, ModelDigest: m.digest, StagedPath: m.path,
		EngineVersion: m.version, HealthFailures: slices.Clone(m.healthFailures), LastHeartbeat: m.heartbeat,
		ReadyAt: m.readyAt, Starts: m.starts, Policy: st, Held: m.held, Operation: m.operation(), Progress: m.progressOf(),
	}
	if m.state == Idle || m.state == Sleeping {
		v.IdleSince = m.idleSince
	}
	return v
}

// ready says whether the pool takes leases: Ready, on a healthy engine
// nobody is stopping.
func (m *Machine) ready() bool {
	return m.state == Ready && m.run != nil && m.run.healthy && !m.run.dead && m.run.stopping == NotStopping
}

// operation names the long operation under way (the pool's Operation
// property): the phase of a reload, a drain or a start, else the engine's
// state.
func (m *Machine) operation() string {
	if m.rollback != nil {
		return "rolling-back"
	}
	if op := m.reload; op != nil {
		switch op.phase {
		case reloadDraining, reloadStaging, reloadRollingBack:
			return op.phase.String()
		}
		// Stopping the old engine is part of starting the new one.
		if m.state == Warming {
			return "warming"
		}
		return "starting"
	}
	switch {
	case m.drain != nil:
		return "draining"
	case m.start != nil && m.start.phase == startStaging && !m.start.candidate:
		// A reload's new engine was staged by the reload: its start's
		// own staging is a few stats.
		return "staging"
	case m.state == Warming:
		return "warming"
	case m.state == Starting:
		return "starting"
	case m.frac.hashing:
		return "staging"
	}
	return ""
}

// progressOf is how far the operation under way has come: leases
// released of those held when a drain began, bytes hashed while staging;
// -1 when unknown, 0 with nothing under way.
func (m *Machine) progressOf() float64 {
	switch m.operation() {
	case "":
		return 0
	case "draining":
		d := m.drain
		if d.held == 0 || !d.res.LeasesDrainedAt.IsZero() || d.res.Outcome == Forced {
			return 1
		}
		return float64(d.held-len(m.leases)) / float64(d.held)
	case "staging":
		if m.start == nil && m.reload == nil && m.frac.hashing {
			return m.frac.hash
		}
		return m.frac.stage
	}
	return -1
}

// Step feeds one event at now and returns what to do, in order.
func (m *Machine) Step(now time.Time, ev Event) []Action {
	m.now = now
	m.out = nil
	switch e := ev.(type) {
	case StartRequested:
		m.startRequested(e)
	case DrainRequested:
		m.drainRequested(e)
	case ParkRequested:
		m.parkRequested(e)
	case EnsureReadyRequested:
		m.ensureReady(e)
	case IdleRestored:
		m.idleRestored(e)
	case ReloadRequested:
		m.reloadRequested(e)
	case ResetBreakerRequested:
		m.resetBreaker()
	case AllowRestartRequested:
		m.allowRestart(e)
	case LeaseRequested:
		m.leaseRequested(e)
	case LeaseReleased:
		m.leaseReleased(e)
	case OwnerGone:
		m.ownerGone(e)
	case Adopted:
		m.adopted(e)
	case ModelStaged:
		m.frac.stage = -1
		m.modelStaged(e)
	case Hashing:
		m.frac.hashing, m.frac.hash = !e.Done, e.Fraction
	case StageProgress:
		if (m.start != nil && m.start.run == e.Run && m.start.phase == startStaging) ||
			(m.reload != nil && m.reload.phase == reloadStaging && m.reload.stageRun == e.Run) {
			m.frac.stage = e.Fraction
		}
	case EngineStarted:
		m.engineStarted(e)
	case StartFailed:
		m.startFailed(e)
	case Healthy:
		m.healthy(e)
	case WarmedUp:
		m.warmedUp(e)
	case Probed:
		m.probed(e)
	case Progress:
		m.progress(e)
	case StartTimedOut:
		if r := m.unstopped(e.Run); r != nil {
			r.lastProbe = e.Err.Error()
			m.stopRun(StopStartTimeout)
		}
	case Faulted:
		m.faulted(e)
	case Squatted:
		if m.unstopped(e.Run) != nil {
			m.lastErr = safetext.Bound("not ready: " + e.Msg)
			m.log(slog.LevelWarn, "engine's port held by a process outside its scope", journal.Error, e.Msg)
		}
	case Exited:
		m.exited(e)
	case ScopeStopped:
		m.scopeStopped(e)
	case VersionKnown:
		m.versionKnown(e)
	case GPUUnhealthy:
		m.gpuUnhealthy(e)
	case GPUUsable:
		m.gpuUsable(e)
	case UnitChanged:
		m.unitChanged(e.Event)
	case TimerFired:
		m.timerFired(e)
	case Died:
		// Not ready from now: the exit itself waits for the shim's
		// word (what the engine wrote, its scope's OOM count).
		if r := m.unstopped(e.Run); r != nil {
			r.dead = true
		}
	case Slept:
		m.slept(e)
	case Woke:
		m.woke(e)
	case ScopePrepared:
		if m.prepared != nil {
			m.prepared.inv = e.Invocation
		}
	default:
		panic(fmt.Sprintf("lifecycle: unknown event %T", ev))
	}
	m.settleWaiters()
	m.settleParks()
	m.recordSleep()
	m.keepPrepared()
	m.publish()
	out := m.out
	m.out = nil
	return out
}

func (m *Machine) do(a ...Action) { m.out = append(m.out, a...) }

// publish says the new state if it changed.
func (m *Machine) publish() {
	v := m.View(m.now)
	if viewEqual(v, m.published) {
		return
	}
	m.published = v
	m.do(Publish{View: v})
}

func viewEqual(a, b View) bool {
	if !slices.Equal(a.HealthFailures, b.HealthFailures) || a.Policy.Breaker != b.Policy.Breaker ||
		a.Policy.Streak != b.Policy.Streak || a.Policy.RestartRate != b.Policy.RestartRate ||
		a.Policy.CrashCount != b.Policy.CrashCount || a.Policy.RestartCount != b.Policy.RestartCount {
		return false
	}
	// Each class's breaker is not published; its gauge follows the
	// Journal action.
	a.HealthFailures, b.HealthFailures = nil, nil
	a.Policy, b.Policy = policy.Status{}, policy.Status{}
	return reflect.DeepEqual(a, b)
}

func (m *Machine) log(level slog.Level, msg string, attrs ...any) {
	m.do(Log{Level: level, Msg: msg, Attrs: attrs})
}

// policy journals the tracker's events, persists it and keeps its tick.
func (m *Machine) policy(events []policy.Event) {
	// Even no event moves the gauges (the restart rate falls as time
	// passes).
	m.do(Journal{Events: events, Persist: len(events) > 0})
	m.armTick()
}

func (m *Machine) armTick() {
	if next := m.tr.NextTick(); !next.IsZero() {
		m.arm(TimerTick, next)
	} else {
		m.disarm(TimerTick)
	}
}

func (m *Machine) arm(t Timer, at time.Time) {
	m.timers.gen[t]++
	m.timers.armed[t] = true
	m.do(ArmTimer{Timer: t, At: at, Gen: m.timers.gen[t]})
}

func (m *Machine) disarm(t Timer) {
	if m.timers.armed[t] {
		m.timers.gen[t]++
		m.timers.armed[t] = false
		m.do(CancelTimer{Timer: t})
	}
}

// Init is the first step: the restored policy's gauges and next tick.
func (m *Machine) Init(now time.Time) []Action {
	m.now = now
	m.out = nil
	m.policy(nil)
	m.publish()
	out := m.out
	m.out = nil
	return out
}

// unstopped returns the current run if it is id and nobody is stopping
// it: the run whose probes, faults and warm-up still count. A run the
// kernel said died (dead) is returned too: its exit, still to come,
// settles it.
func (m *Machine) unstopped(id RunID) *run {
	if r := m.run; r != nil && r.id == id && r.stopping == NotStopping {
		return r
	}
	return nil
}

// busy says why a start or a reload must wait, or "".
func (m *Machine) busy() bool {
	return m.run != nil || m.drain != nil || m.reload != nil || m.start != nil || m.pending != nil
}

// reply answers a request; the state it leaves is published first, so a
// caller that reads it after the answer sees it.
func (m *Machine) reply(r Reply) {
	if r.Req != 0 {
		m.publish()
		m.do(r)
	}
}

// ---- starting

func (m *Machine) startRequested(e StartRequested) {
	if m.drain == nil && m.reload == nil && m.pending == nil && (m.state == Sleeping || m.state == Waking) {
		// Start of a sleeping pool wakes it, as a start of a starting
		// pool leaves it starting.
		m.wakeSleeping()
		m.reply(Reply{Req: e.Req})
		return
	}
	// As systemctl start of an active unit: a pool on its way up or up
	// already is left as it is. A drain or reload under way is not that.
	if m.drain == nil && m.reload == nil && m.pending == nil && (m.state == Starting || m.state == Warming || m.state == Ready) {
		m.reply(Reply{Req: e.Req})
		return
	}
	if m.busy() {
		m.reply(Reply{Req: e.Req, Err: fmt.Errorf("pool %s is %s: %w", m.cfg.Pool, m.state, ErrBusy)})
		return
	}
	if err := m.mayStart(); err != nil {
		m.reply(Reply{Req: e.Req, Err: err})
		return
	}
	m.cancelRestart()
	m.disarm(TimerRetry)
	m.startEngine(false, e.Req)
}

// mayStart asks the policy whether an engine may start on request now; a
// refusal keeps a pending restart scheduled for when it may.
func (m *Machine) mayStart() error {
	if m.held != "" {
		return fmt.Errorf("pool %s: %w: %s", m.cfg.Pool, ErrBreakerOpen, m.held)
	}
	if why := m.gpuWhy(); why != "" {
		return fmt.Errorf("pool %s: %w: %s", m.cfg.Pool, ErrGPUUnhealthy, why)
	}
	pending := m.tr.Status(m.now).Pending
	pm, err := m.tr.Start(m.now)
	m.policy(pm.Events)
	var r *policy.Refusal
	if errors.As(err, &r) {
		if pending {
			m.transition(Failed, "restart refused")
			m.next = r.RetryAt
			if !r.RetryAt.IsZero() {
				m.scheduleRestart(r.RetryAt)
			}
		}
		return fmt.Errorf("pool %s: %w: %v", m.cfg.Pool, ErrBreakerOpen, err)
	}
	return err
}

func (m *Machine) cancelRestart() {
	m.disarm(TimerRestart)
	m.unprepare()
}

func (m *Machine) scheduleRestart(at time.Time) {
	m.arm(TimerRestart, at)
	if m.prepared == nil {
		m.prepareAhead(at)
	}
}

// stageRef is the model the next engine loads (a reload's, an adopted
// engine's, else the configured one) and the digest it must have: the
// configured digest pins the configured model only.
func (m *Machine) stageRef() (ref, want string) {
	if m.current.Ref != "" && m.current.Ref != m.cfg.Model {
		return m.current.Ref, ""
	}
	return m.cfg.Model, m.cfg.ModelDigest
}

// startEngine starts an engine: its model is staged before every start
// (cheap when unchanged), then it is launched.
func (m *Machine) startEngine(candidate bool, req ReqID) {
	m.transition(Starting, "start")
	m.next, m.healthFailures, m.noMemory = time.Time{}, nil, false
	m.frac.stage = -1
	m.runs++
	m.start = &startOp{run: m.runs, candidate: candidate, req: req}
	ref, want := m.stageRef()
	m.do(Stage{Run: m.runs, Ref: ref, Want: want})
}

func (m *Machine) modelStaged(e ModelStaged) {
	if op := m.reload; op != nil && op.phase == reloadStaging && op.stageRun == e.Run {
		m.reloadStaged(e)
		return
	}
	op := m.start
	if op == nil || op.run != e.Run || op.phase != startStaging {
		return
	}
	if e.Err != nil {
		m.start = nil
		m.transition(Failed, "staging failed")
		m.lastErr = safetext.Bound(e.Err.Error())
		m.startDone(op, e.Err)
		return
	}
	m.startTo(op, startLaunching)
	op.staged = e.Staged
	m.current = e.Staged
	m.do(Launch{Run: op.run, Staged: e.Staged, Candidate: op.candidate, Prepared: m.prepared != nil})
	m.prepared = nil
}

func (m *Machine) startFailed(e StartFailed) {
	op := m.start
	if op == nil || op.run != e.Run {
		return
	}
	m.start = nil
	m.lastErr = safetext.Bound(e.Err.Error())
	if heldByOthers(e.Err) && op.onDemand && m.drain == nil {
		// Its callers hear who holds it (settleWaiters); the pool waits
		// for its next use, not in a retry loop that would start an
		// engine nobody waits for.
		m.noMemory = errors.Is(e.Err, ErrNoGPUMemory)
		m.idleAgain("its start on demand was held: " + m.lastErr)
		m.reply(Reply{Req: op.req, Err: e.Err})
		return
	}
	m.transition(Failed, "launch failed")
	if heldByOthers(e.Err) && !op.candidate {
		// Another process holds the GPUs, their memory or the port: no
		// crash of ours; the start looks again later, and the operator
		// (told now, if they asked) sees who holds them.
		m.noMemory = errors.Is(e.Err, ErrNoGPUMemory)
		m.retryLater(e.Err)
		m.reply(Reply{Req: op.req, Err: e.Err})
		return
	}
	m.startDone(op, e.Err)
}

// heldByOthers says whether a start was refused for what other
// processes hold: the GPUs, their memory or the engine's port.
func heldByOthers(err error) bool {
	return errors.Is(err, ErrGPUBusy) || errors.Is(err, ErrPortBusy) || errors.Is(err, ErrNoGPUMemory)
}

// retryLater arms the retry of a start that another process held (err
// says which): the GPUs are looked at again after GPURetry, a port after
// PortRetry.
func (m *Machine) retryLater(err error) {
	retry := cmp.Or(m.cfg.GPURetry, GPURetry)
	switch {
	case errors.Is(err, ErrPortBusy):
		retry = cmp.Or(m.cfg.PortRetry, PortRetry)
	case errors.Is(err, ErrNoGPUMemory):
		retry = cmp.Or(m.cfg.MemoryRetry, MemoryRetry)
	}
	m.next = m.now.Add(retry)
	m.arm(TimerRetry, m.next)
}

func (m *Machine) engineStarted(e EngineStarted) {
	op := m.start
	if op == nil || op.run != e.Run || op.phase != startLaunching {
		// A start called off while it launched: its engine must not
		// run unwatched.
		m.stopScope(e.Run)
		return
	}
	m.start = nil
	if e.Caution != "" {
		// Said where nothing else is: a crash's reason stays the
		// LastError of the restart it caused.
		if m.lastErr == "" {
			m.lastErr = safetext.Bound(e.Caution)
		}
		m.log(slog.LevelWarn, "engine started on an incomplete check", journal.Error, safetext.Bound(e.Caution))
	}
	m.run = &run{id: e.Run, pid: e.PID, started: m.now, staged: op.staged, candidate: op.candidate, invocation: e.Invocation, onDemand: op.onDemand}
	m.live, m.pid, m.starts = true, e.PID, m.starts+1
	m.digest, m.path = op.staged.Digest, op.staged.Path
	m.do(Watch{Run: e.Run})
	m.startDone(op, nil)
}

// startDone tells whoever started an engine whether its process runs.
func (m *Machine) startDone(op *startOp, err error) {
	switch {
	case op.candidate:
		if err != nil {
			m.candidateFailed("start", "the new engine did not start: "+err.Error())
		}
	case op.req != 0:
		m.reply(Reply{Req: op.req, Err: err})
	case err != nil && !errors.Is(err, ErrBusy):
		// A restart (or rollback) that could not start an engine is a
		// crash like any other.
		m.crashed(nil, crash.StartFailure, err.Error(), nil, -1)
	}
}

// cancelStart calls off a start that has not launched.
func (m *Machine) cancelStart(why string) {
	op := m.start
	if op == nil {
		return
	}
	m.start = nil
	if op.phase == startLaunching {
		// Launch is out: its EngineStarted stops the scope.
		return
	}
	m.startDone(op, fmt.Errorf("start of pool %s called off: %s: %w", m.cfg.Pool, why, ErrBusy))
}

func (m *Machine) restartDue() {
	if m.busy() {
		return
	}
	if why := m.gpuWhy(); why != "" {
		// No restart loop against a GPU that needs a reset.
		m.transition(Failed, "restart held by a GPU")
		m.next, m.lastErr = time.Time{}, why
		return
	}
	pm, err := m.tr.Restart(m.now)
	m.policy(pm.Events)
	var r *policy.Refusal
	switch {
	case errors.As(err, &r):
		// No scope waits through a breaker's or a storm's hold.
		m.unprepare()
		m.transition(Failed, "restart refused")
		m.next = r.RetryAt
		if !r.RetryAt.IsZero() {
			m.scheduleRestart(r.RetryAt)
		}
		return
	case err != nil:
		return
	}
	m.startEngine(false, 0)
}

// gpuWhy says why the pool's GPUs hold it ("" if they do not).
func (m *Machine) gpuWhy() string {
	var whys []string
	for _, w := range m.gpuHeld {
		whys = append(whys, w)
	}
	slices.Sort(whys)
	return strings.Join(whys, "; ")
}

// gpuUnhealthy holds the pool on a GPU that needs a reset: its engine is
// stopped (a driver_xid crash) and it does not restart until the GPU is
// usable again or an operator says AllowRestart.
func (m *Machine) gpuUnhealthy(e GPUUnhealthy) {
	why := safetext.Bound(e.Why)
	m.gpuHeld[e.GPU] = why
	m.cancelRestart()
	m.disarm(TimerRetry)
	m.cancelStart("its GPU needs a reset")
	if r := m.run; r != nil && r.stopping == NotStopping && !r.candidate {
		r.fault, r.xid = why, true
		m.stopRun(StopFault)
		return
	}
	// A start left under way is a rollback's, begun as the reload's new
	// engine was called off: the pool is Starting it.
	if m.run == nil && m.drain == nil && m.reload == nil && m.start == nil {
		m.transition(Failed, "GPU hold")
		m.next, m.lastErr = time.Time{}, why
	}
}

// gpuUsable lifts a GPU's hold; a restart held by it happens now.
func (m *Machine) gpuUsable(e GPUUsable) {
	if _, ok := m.gpuHeld[e.GPU]; !ok {
		return
	}
	delete(m.gpuHeld, e.GPU)
	if len(m.gpuHeld) > 0 {
		return
	}
	m.log(slog.LevelInfo, "the pool's GPU is usable again: hold lifted", journal.GPU, e.GPU)
	if m.tr.Status(m.now).Pending && m.drain == nil && m.run == nil {
		m.scheduleRestart(m.now)
	} else if m.state == Failed && m.run == nil && m.held == "" {
		m.transition(Stopped, "GPU hold lifted")
	}
}

func (m *Machine) resetBreaker() {
	if m.held != "" {
		m.log(slog.LevelWarn, "hold lifted by ResetBreaker: the pool starts with fresh counters")
		m.held = ""
		if m.state == Failed && m.run == nil {
			m.transition(Stopped, "hold lifted")
		}
	}
	m.policy(m.tr.ResetBreaker(m.now))
	if m.tr.Status(m.now).Pending && m.drain == nil {
		m.scheduleRestart(m.now)
	}
}

func (m *Machine) allowRestart(e AllowRestartRequested) {
	if len(m.gpuHeld) > 0 {
		// The operator vouches for the GPU.
		m.log(slog.LevelWarn, "AllowRestart: the pool's GPU hold is lifted by an operator", journal.Error, m.gpuWhy())
		clear(m.gpuHeld)
		if m.tr.Status(m.now).Pending && m.drain == nil {
			m.scheduleRestart(m.now)
		}
		m.reply(Reply{Req: e.Req})
		return
	}
	ev, err := m.tr.AllowRestart(m.now)
	m.policy(ev)
	if err == nil && m.drain == nil {
		m.scheduleRestart(m.now)
	}
	m.reply(Reply{Req: e.Req, Err: err})
}

// ---- a running engine

func (m *Machine) healthy(e Healthy) {
	r := m.unstopped(e.Run)
	if r == nil {
		return
	}
	r.healthy = true
	if r.sleep.asleep {
		// Adopted asleep: it sleeps on, woken once it is wanted.
		if m.state == Sleeping && m.drain == nil && (r.sleep.wanted || len(m.waiters) > 0) {
			m.wakeRun(r)
		}
		return
	}
	if d := m.drain; d != nil && d.reload == nil {
		// The drain goes on: the pool stays Draining, and the engine it
		// stops serves nobody.
		return
	}
	if m.wakeAdopted(r) {
		return
	}
	m.awake(r)
}

// awake: a healthy engine (woken, if it was adopted with Sleep=) warms
// up or serves.
func (m *Machine) awake(r *run) {
	if m.cfg.Warmup {
		// A reload's new engine warms up too: nothing is Ready before it
		// has answered a real request.
		m.transition(Warming, "healthy")
		m.do(Warmup{Run: r.id})
		return
	}
	m.serving(r)
}

func (m *Machine) warmedUp(e WarmedUp) {
	r := m.unstopped(e.Run)
	if r == nil || !r.healthy || r.warm || m.state != Warming {
		return
	}
	if e.Err != nil && r.waking() {
		m.wakeFailed(r, "warm-up request after the wake failed: "+safetext.Bound(e.Err.Error()))
		return
	}
	if e.Err != nil {
		r.lastProbe = "warm-up request failed: " + e.Err.Error()
		m.stopRun(StopStartTimeout)
		return
	}
	m.serving(r)
}

// serving: a healthy engine is Ready (a reload's candidate is the
// reload's business).
func (m *Machine) serving(r *run) {
	r.warm = true
	if r.candidate {
		m.candidateHealthy(r)
		return
	}
	m.policy(m.tr.Healthy(m.now))
	// LastError stays: it is the last error, not the current one.
	m.transition(Ready, "serving")
	m.heartbeat = m.now
	if r.waking() {
		m.woken(r)
		m.rollbackSettled()
		return
	}
	m.readyAt = m.now
	m.writeRecord(r, m.model)
	m.do(Log{Level: slog.LevelInfo, Msg: "engine ready", Engine: true, Attrs: []any{journal.StartupSec, m.now.Sub(r.started).Seconds()}})
	m.rollbackSettled()
}

func (m *Machine) probed(e Probed) {
	r := m.unstopped(e.Run)
	if r == nil {
		return
	}
	if e.Canary {
		m.canaryProbed(r, e.Err)
		return
	}
	if e.Err == nil {
		if len(r.failures) > 0 {
			r.failures, m.heartbeat = nil, m.now
			m.healthFailures = r.allFailures()
			return
		}
		// A heartbeat alone wakes nobody: it is read, not watched.
		m.heartbeat = m.now
		m.published.LastHeartbeat = m.now
		m.do(Heartbeat{At: m.now})
		return
	}
	msg := safetext.Bound(e.Err.Error())
	r.failures = append(r.failures, m.now)
	r.lastProbe = msg
	m.healthFailures = r.allFailures()
	m.do(CountHealthFailure{})
	m.log(slog.LevelWarn, "health probe failed", journal.FailureCount, len(r.failures), journal.Error, msg)
	switch {
	case r.fault != "" && m.timers.armed[TimerFault]:
		// The fault line it printed is confirmed.
		m.disarm(TimerFault)
		m.stopRun(StopFault)
	case len(r.failures) >= m.cfg.FailureThreshold:
		m.stopRun(StopHealth)
	}
}

// allFailures are the run's current failed probes and canaries, in time
// order (nil: none).
func (r *run) allFailures() []time.Time {
	all := append(slices.Clone(r.failures), r.canaryFailures...)
	slices.SortFunc(all, time.Time.Compare)
	return all
}

// canaryProbed counts a serving engine's canaries: only a good one resets
// their failures, and FailureThreshold in a row stop it as unhealthy.
func (m *Machine) canaryProbed(r *run, err error) {
	if !r.warm || m.asleep(r) {
		// Asleep, an engine refuses to generate: no canary counts.
		// Not serving yet: the warm-up is its test.
		return
	}
	if err == nil {
		if len(r.canaryFailures) > 0 {
			r.canaryFailures = nil
			m.healthFailures = r.allFailures()
			m.log(slog.LevelInfo, "canary request succeeded again")
		}
		return
	}
	msg := "canary request failed: " + safetext.Bound(err.Error())
	r.canaryFailures = append(r.canaryFailures, m.now)
	r.lastProbe = msg
	m.healthFailures = r.allFailures()
	m.do(CountHealthFailure{})
	m.log(slog.LevelWarn, "canary request failed", journal.FailureCount, len(r.canaryFailures), journal.Error, safetext.Bound(err.Error()))
	switch {
	case r.fault != "" && m.timers.armed[TimerFault]:
		m.disarm(TimerFault)
		m.stopRun(StopFault)
	case len(r.canaryFailures) >= m.cfg.FailureThreshold:
		r.byCanary = true
		m.stopRun(StopHealth)
	}
}

// progress watches a serving engine's counters: requests in flight and
// the token count unchanged for Stall is a stall; an idle engine, or a
// busy one whose count moves, never is. A metrics endpoint that stops
// answering while requests were in flight counts as no token; one that
// answers nonsense is reported once and changes nothing.
func (m *Machine) progress(e Progress) {
	if d := m.drain; d != nil && d.phase == drainRequests && m.run != nil && m.run.id == e.Run {
		m.drainProgress(d, e)
	}
	r := m.unstopped(e.Run)
	if r != nil && r.healthy {
		m.progressUse(r, e)
	}
	if r == nil || !r.healthy || m.cfg.Stall <= 0 {
		return
	}
	if m.asleep(r) {
		// Asleep it makes no token: the clock starts when it serves.
		r.movedAt, r.inFlight = time.Time{}, 0
		return
	}
	if e.Err != nil && !(e.NoAnswer && r.inFlight > 0 && !r.movedAt.IsZero()) {
		if !r.progressBad {
			r.progressBad = true
			m.log(slog.LevelWarn, "engine's metrics endpoint unusable: no stall detection until it answers", journal.Error, safetext.Bound(e.Err.Error()))
		}
		return
	}
	if e.Err != nil {
		// Silent with work in flight: as if no token came.
		e.InFlight, e.Tokens = r.inFlight, r.tokens
	} else if r.progressBad {
		r.progressBad = false
		m.log(slog.LevelInfo, "engine's metrics endpoint answers again: stall detection on")
	}
	// The clock starts when the count moves, or when work is first seen
	// in flight after an idle sample.
	if r.movedAt.IsZero() || e.InFlight <= 0 || r.inFlight <= 0 || e.Tokens != r.tokens {
		r.tokens, r.movedAt, r.inFlight = e.Tokens, m.now, e.InFlight
		return
	}
	if m.now.Sub(r.movedAt) >= m.cfg.Stall {
		what := fmt.Sprintf("%g request(s) in flight and no token for %s (tokens stayed at %g)",
			e.InFlight, m.now.Sub(r.movedAt).Round(time.Millisecond), e.Tokens)
		if e.Err != nil {
			what += "; its metrics endpoint stopped answering"
		}
		r.lastProbe = what
		m.stopRun(StopStall)
	}
}

func (m *Machine) faulted(e Faulted) {
	r := m.run
	if r == nil || (e.Run != 0 && r.id != e.Run) {
		return
	}
	if e.XID {
		if r.stopping != NotStopping {
			return
		}
		r.fault, r.xid = e.What, true
		m.log(slog.LevelError, "GPU XID event", journal.XID, e.Code, journal.GPU, e.GPU)
	} else {
		r.fault = safetext.Bound(e.What)
		m.log(slog.LevelError, "GPU fault in engine output", journal.Line, r.fault)
		// A line is text, and an engine's output may quote its clients:
		// it only classifies the engine's death, or a failed probe,
		// that comes within FaultConfirm. A broken engine is still
		// caught by its exit, its probes, the stall rule or a canary.
		m.arm(TimerFault, m.now.Add(FaultConfirm))
		return
	}
	m.stopRun(StopFault)
}

// faultUnconfirmed: an engine printed a GPU fault line and neither died
// nor failed a probe: the line was text, not the engine's fault.
func (m *Machine) faultUnconfirmed() {
	r := m.run
	if r == nil || r.stopping != NotStopping || r.fault == "" || r.xid {
		return
	}
	m.log(slog.LevelWarn, "GPU fault text in the engine's output was followed by neither its death nor a failed probe: not acted on",
		journal.Line, r.fault)
	r.fault = ""
}

func (m *Machine) versionKnown(e VersionKnown) {
	if e.Version == m.version {
		return
	}
	m.version = e.Version
	if _, ok := m.RecordWritable(); ok {
		m.writeRecord(m.run, m.model)
	}
}

// stopRun stops the current engine; its exit comes as an event.
func (m *Machine) stopRun(why StopReason) {
	r := m.run
	if r == nil || r.stopping != NotStopping {
		return
	}
	r.stopping = why
	m.do(StopProbes{Run: r.id})
	m.stopScope(r.id)
}

// stopScope has run's scope stopped; until its job ends (ScopeStopped)
// a drain is not answered: like systemctl stop, a Stop returns when
// nothing of the engine's scope runs, its shim included.
func (m *Machine) stopScope(run RunID) {
	m.scopeStops[run] = true
	m.do(StopScope{Run: run})
}

func (m *Machine) scopeStopped(e ScopeStopped) {
	if !m.scopeStops[e.Run] {
		return
	}
	delete(m.scopeStops, e.Run)
	if d := m.drain; d != nil && d.reload == nil && d.engineGone && len(m.scopeStops) == 0 {
		m.finishDrain()
	}
}
