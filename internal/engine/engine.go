// Package engine runs inference engines in transient systemd scopes: each
// engine in its own scope in pool-managerd-engines.slice, restricted to its
// GPUs' device nodes, as its unprivileged user, with its output in the
// journal under the scope, and reports how it ended.
package engine

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	sddbus "github.com/coreos/go-systemd/v22/dbus"
	"github.com/coreos/go-systemd/v22/unit"
	"github.com/godbus/dbus/v5"
	"golang.org/x/sys/unix"

	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/model"
	"github.com/llorch/pool-managerd/internal/shim"
	"github.com/llorch/pool-managerd/internal/sockdiag"
	"github.com/llorch/pool-managerd/internal/witness"
)

// Slice holds every engine scope.
const Slice = "pool-managerd-engines.slice"

// UnitName is the scope of a pool's engine.
func UnitName(pool string) string { return "pool-engine-" + unit.UnitNameEscape(pool) + ".scope" }

// ScopeCgroup is the cgroup v2 path of a pool's scope as the system
// manager makes it: Slice within its parents
// (pool.slice/pool-managerd.slice/...) below the manager's root. It is
// matched whole: a user's own scope of the same name lives elsewhere
// (under user.slice).
func ScopeCgroup(pool string) string {
	path, prefix := managerRoot(), ""
	for _, part := range strings.Split(strings.TrimSuffix(Slice, ".slice"), "-") {
		prefix += part
		path += "/" + prefix + ".slice"
		prefix += "-"
	}
	return path + "/" + UnitName(pool)
}

// managerRoot is the system manager's root cgroup: where its own
// init.scope is, as systemd finds it (cg_get_root_path); "" on a host,
// deeper in a container that shares the host's cgroup namespace.
var managerRoot = sync.OnceValue(func() string {
	b, err := os.ReadFile("/proc/1/cgroup")
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			root, _ := strings.CutSuffix(p, "/init.scope")
			if root == p {
				return "" // PID 1 is no systemd
			}
			return root
		}
	}
	return ""
})

// Spec is one engine to run.
type Spec struct {
	Pool        string
	Description string
	Argv        []string
	// Env is added to the engine's minimal environment.
	Env []string
	// User names the engine's user, looked up through NSS at each start;
	// Account, when set, gives the credential instead (a user of the
	// pool's own, which NSS does not know).
	User    string
	Account func() (model.User, error)
	// DeviceNodes are the only device nodes (besides the standard pseudo
	// devices) the engine may open.
	DeviceNodes []string
	Scope       []config.ScopeProperty
	StopTimeout time.Duration
	// Socket is where the shim listens for a restarted daemon.
	Socket string
	// CacheDir, when set, is the engine's writable HOME and cache
	// directory, made (owned by User=, mode 0700) before each start and
	// kept across them. See CacheEnv.
	CacheDir string
	// Note is JSON the shim keeps for a restarted daemon: Attach gives
	// it back in Engine.Note.
	Note []byte
	// Precheck, if set, runs while systemd makes the scope; an error
	// calls the start off before the engine is run. See Precheck.
	Precheck Precheck
	// Version is the pool's VersionCommand (nil: none): the shim runs it
	// beside the engine, as the engine's user in its scope, and reports
	// what it printed as an Event.
	Version []string
}

// Precheck is a check run before an engine starts. scope waits until the
// engine's scope is made and gives the id of its cgroup (from the shim,
// the daemon's own child, in it): what is in that cgroup is the pool's
// own, whatever its unit is called elsewhere.
type Precheck func(scope func() (uint64, error)) error

// Event is something an engine's shim reported after the start.
type Event struct {
	// Fault is an output line that showed a GPU fault; the engine may
	// still be running.
	Fault string
	// Version is what the VersionCommand printed (its head), VersionErr
	// why it failed: the engine's text either way.
	Version, VersionErr string
	// Exit is set when the engine is gone.
	Exit *lifecycle.Exit
}

// LostVanished is Exit.LostWhy when the shim's stream ended with no exit.
const LostVanished = "the shim ended without reporting the engine's exit"

// StartPhases splits a start, for the journal and make bench.
type StartPhases struct {
	// Shim: the engine's account and the shim's fork and exec.
	Shim time.Duration
	// Scope: StartTransientUnit until systemd's job is done, with any
	// leftover scope of the same name stopped first.
	Scope time.Duration
	// Exec: the go-ahead until the shim reports the engine started.
	Exec time.Duration
	// Invocation: reading the scope's InvocationID, beyond Exec (it runs
	// alongside it).
	Invocation time.Duration
	// Leftover: the part of Scope spent on an earlier scope of the same
	// name that was still there.
	Leftover time.Duration
	// Precheck: Spec.Precheck's own time, alongside Scope (before the
	// go-ahead, for a prepared scope).
	Precheck time.Duration
	// Ahead: how long a prepared scope waited for its go-ahead (0: made
	// on the start's path); Shim and Scope were then off the path.
	Ahead time.Duration
}

// Engine is one running engine.
type Engine struct {
	Unit    string
	PID     int
	ShimPID int
	Started time.Time
	// Note is Spec.Note of the start.
	Note []byte
	// CgroupID is the id of the scope's cgroup (0: not known): a socket
	// or process is the engine's when it is in that cgroup.
	CgroupID uint64
	// Invocation is the scope's InvocationID (hex) as systemd gave it
	// when the engine started or was adopted ("" if it could not be
	// read): systemd's word on a scope of the same name from another
	// start is not about this engine.
	Invocation string
	// Phases is where the start's time went (zero for an adopted engine).
	Phases StartPhases
	events chan Event
	// shimEnded waits a moment for the shim the daemon started to be
	// reaped and says how it ended (nil for an adopted engine).
	shimEnded func(wait time.Duration) (syscall.WaitStatus, bool)
	// oomFile is the scope's OOM kill counter ("" if not known) and
	// oomBefore its count before the engine ran (see scopeOOMKills).
	oomFile   string
	oomBefore uint64
	diedMu    sync.Mutex
	dead      bool
	onDied    func()
}

// scopeOOMKills reads the OOM kills in the scope since the engine's
// start, from outside it (0 where the counter is not known).
func (e *Engine) scopeOOMKills() uint64 {
	return max(shim.OOMKills(e.oomFile), e.oomBefore) - e.oomBefore
}

// OnDied has f called once when the kernel says the engine process ended
// (at once if it has), before its shim reports how: the shim first reads
// what the engine wrote and its scope's OOM count. f is called from the
// goroutine that hears the kernel. It is not called if the kernel cannot
// be asked (no pidfd), and it may come after the shim's report.
func (e *Engine) OnDied(f func()) {
	e.diedMu.Lock()
	defer e.diedMu.Unlock()
	if e.dead {
		go f()
		return
	}
	e.onDied = f
}

// watchDeath waits, in the runtime's poller, for the engine's pidfd to
// say it ended. The pidfd is opened before the watch goes to its own
// goroutine, so an engine killed the moment it started is still seen to
// end: a PID that is already gone then is the engine's end. A PID reused
// in the meantime (the engine ended and was reaped at once) would be
// another live process: its end would come after the shim's report, when
// no one listens any more.
func (e *Engine) watchDeath() {
	f, err := openPidfd(e.PID)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			go e.died()
		}
		return
	}
	go func() {
		if awaitFile(f) {
			e.died()
		}
	}()
}

// died records the kernel's word and tells whoever listens.
func (e *Engine) died() {
	e.diedMu.Lock()
	e.dead = true
	tell := e.onDied
	e.diedMu.Unlock()
	if tell != nil {
		tell()
	}
}

// Events delivers the engine's faults and, last, its exit; then it closes.
func (e *Engine) Events() <-chan Event { return e.events }

// Runtime starts and stops engines through systemd.
type Runtime struct {
	// Witness, when set, is told of every stop the daemon makes, so that
	// systemd's report of it is not taken for an operator's.
	Witness *witness.Witness
	// shim is the command re-executed as the shim (the daemon binary).
	shim []string

	mu   sync.Mutex
	conn *sddbus.Conn
	// private: conn is systemd's private socket, not the system bus.
	private bool
}

// New connects to systemd (see systemd). shim is the command line of
// the shim (see ShimCommand).
func New(ctx context.Context, shim []string) (*Runtime, error) {
	r := &Runtime{shim: shim}
	if _, err := r.systemd(ctx); err != nil {
		return nil, err
	}
	return r, nil
}

// systemd is the connection to systemd: its private socket, as systemctl
// and systemd-run use as root (a unit's start and its job's end then take
// no trip through the bus daemon), else the system bus. A re-executing
// systemd closes the private socket: a connection found closed, or
// dropped after an error, is made again.
func (r *Runtime) systemd(ctx context.Context) (*sddbus.Conn, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.conn != nil && r.conn.Connected() {
		return r.conn, nil
	}
	if r.conn != nil {
		r.conn.Close()
		r.conn = nil
	}
	c, err := privateConn()
	r.private = err == nil
	if err != nil {
		c, err = sddbus.NewSystemConnectionContext(ctx)
	}
	if err != nil {
		return nil, fmt.Errorf("connecting to systemd: %w", err)
	}
	r.conn = c
	return c, nil
}

// privateConn connects to systemd's private socket with one connection
// for calls and signals both. systemd sends every unit's and job's signals
// to each private connection, unasked: go-systemd's own private
// connection is two, and each would read all of them (64 scopes starting
// are hundreds of signals).
func privateConn() (*sddbus.Conn, error) {
	var one *dbus.Conn
	return sddbus.NewConnection(func() (*dbus.Conn, error) {
		if one != nil {
			return one, nil
		}
		// No context: the connection outlives the call that makes it.
		c, err := dbus.Dial("unix:path=/run/systemd/private")
		if err != nil {
			return nil, err
		}
		// systemd's own socket: no Hello, and the uid, not a name
		// looked up.
		if err := c.Auth([]dbus.Auth{dbus.AuthExternal(strconv.Itoa(os.Getuid()))}); err != nil {
			c.Close()
			return nil, err
		}
		one = c
		return c, nil
	})
}

// drop forgets c after a failure of its transport, so that the next use
// connects again.
func (r *Runtime) drop(c *sddbus.Conn) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.conn == c {
		r.conn.Close()
		r.conn = nil
	}
}

// transportFailed tells a lost connection from systemd's own refusal.
func transportFailed(err error) bool {
	var de dbus.Error
	return err != nil && !errors.As(err, &de) && !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded)
}

// jobDone waits for the start job of unit to end. On the private socket a
// re-executing systemd takes the job's end with the connection: then the
// unit's state, asked on a new connection, says how it ended.
func (r *Runtime) jobDone(ctx context.Context, sd *sddbus.Conn, unit string, done <-chan string) error {
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case res := <-done:
			if res != "done" {
				return fmt.Errorf("creating %s: job %s", unit, res)
			}
			return nil
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
			if sd.Connected() {
				continue
			}
			for {
				c, err := r.systemd(ctx)
				if err != nil {
					return err
				}
				p, err := c.GetUnitPropertyContext(ctx, unit, "ActiveState")
				if err != nil {
					return fmt.Errorf("creating %s: %w", unit, err)
				}
				switch state, _ := p.Value.Value().(string); state {
				case "active":
					return nil
				case "activating":
					select {
					case <-ctx.Done():
						return ctx.Err()
					case <-time.After(25 * time.Millisecond):
					}
				default:
					return fmt.Errorf("creating %s: the unit is %s after systemd re-executed", unit, state)
				}
			}
		}
	}
}

// ShimPath is where the packages install pool-managerd-shim.
const ShimPath = "/usr/libexec/pool-managerd/pool-managerd-shim"

// ShimCommand is the shim for a daemon running from exe:
// pool-managerd-shim beside it (a build tree), else the installed one. If
// there is neither, the daemon's own binary acts as the shim (it calls
// shim.Main when shim.Env is set) and dedicated is false: that works, but
// each start then waits for the whole daemon binary to start.
func ShimCommand(exe string) (argv []string, dedicated bool) {
	for _, p := range []string{filepath.Join(filepath.Dir(exe), "pool-managerd-shim"), ShimPath} {
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return []string{p}, true
		}
	}
	return []string{exe}, false
}

// Close drops the connection to systemd; engines keep running.
func (r *Runtime) Close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.conn != nil {
		r.conn.Close()
	}
}

type deviceAllow struct {
	Path string
	Perm string
}

func (r *Runtime) properties(s Spec, shimPID int) []sddbus.Property {
	allow := make([]deviceAllow, 0, len(s.DeviceNodes))
	for _, n := range s.DeviceNodes {
		allow = append(allow, deviceAllow{n, "rw"})
	}
	desc := s.Description
	if desc == "" {
		desc = "Engine of pool " + s.Pool
	}
	props := []sddbus.Property{
		sddbus.PropDescription(desc),
		sddbus.PropSlice(Slice),
		sddbus.PropPids(uint32(shimPID)),
		{Name: "DevicePolicy", Value: dbus.MakeVariant("closed")},
		{Name: "DeviceAllow", Value: dbus.MakeVariant(allow)},
		{Name: "TimeoutStopUSec", Value: dbus.MakeVariant(uint64(s.StopTimeout / time.Microsecond))},
		{Name: "SendSIGKILL", Value: dbus.MakeVariant(true)},
		// A crashed engine's scope must not linger as failed and block
		// the next start under the same name.
		{Name: "CollectMode", Value: dbus.MakeVariant("inactive-or-failed")},
	}
	// An OOM kill ends the whole engine (a multi-process engine must not
	// go on half killed) and systemd reports Result=oom-kill, whatever
	// DefaultOOMPolicy= the host sets; a pool's [Scope] may choose
	// otherwise.
	oom := true
	for _, p := range s.Scope {
		oom = oom && p.Name != "OOMPolicy"
	}
	if oom {
		props = append(props, sddbus.Property{Name: "OOMPolicy", Value: dbus.MakeVariant("stop")})
	}
	for _, p := range s.Scope {
		props = append(props, sddbus.Property{Name: p.Name, Value: dbus.MakeVariant(p.Value)})
	}
	return props
}

// Start runs the engine: the shim is started, moved into a new scope, and
// only then allowed to start the engine. It returns once the engine
// process exists. Spec.Precheck runs while systemd makes the scope.
func (r *Runtime) Start(ctx context.Context, s Spec) (*Engine, error) {
	p, err := r.prepare(ctx, s, true)
	if err != nil {
		return nil, err
	}
	return p.goAhead(ctx)
}

// Prepared is an engine's scope made ahead of its start: the shim waits
// in it for the go-ahead, and no engine runs. A restart prepares its
// scope during its backoff, so that systemd's part is off its path.
type Prepared struct {
	r      *Runtime
	pool   string
	name   string
	cmd    *exec.Cmd
	goW    *os.File
	stR    *os.File
	reaped chan struct{}
	// shimStatus is set before reaped is closed.
	shimStatus syscall.WaitStatus
	ph         StartPhases
	// checked is the outcome of the precheck run alongside the scope's
	// creation (Start); nil when the go-ahead runs it (Go).
	checked chan error
	// ready is when the scope was made.
	ready time.Time
	// Invocation is the scope's InvocationID ("" if it could not be
	// read); ahead says it was read while preparing.
	Invocation string
	ahead      bool
	once       sync.Once
	// made is closed once the scope is made (cgroup is its cgroup's id)
	// or could not be (cgroupErr says why).
	made      chan struct{}
	madeOnce  sync.Once
	cgroup    uint64
	cgroupErr error
	// oom is the scope's OOM kill counter, found through the shim
	// once it is in the scope ("" if none).
	oom string
}

// scopeMade records the scope's cgroup, or why there is none.
func (p *Prepared) scopeMade(id uint64, err error) {
	p.madeOnce.Do(func() {
		p.cgroup, p.cgroupErr = id, err
		close(p.made)
	})
}

// scope waits for the scope and gives its cgroup's id.
func (p *Prepared) scope() (uint64, error) {
	<-p.made
	return p.cgroup, p.cgroupErr
}

// ErrPreparedLost: a prepared scope's shim is gone (the scope was stopped
// or killed while it waited); a fresh start is needed.
var ErrPreparedLost = errors.New("the prepared scope's shim is gone")

// Prepare makes the engine's scope with its shim waiting in it, as Start
// does up to the go-ahead, and reads the scope's InvocationID. Go starts
// the engine; Abort gives the scope up. Spec.Precheck is not run: Go
// takes the check to run right before the engine.
func (r *Runtime) Prepare(ctx context.Context, s Spec) (*Prepared, error) {
	p, err := r.prepare(ctx, s, false)
	if err != nil {
		return nil, err
	}
	p.Invocation, p.ahead = r.invocation(ctx, p.name), true
	return p, nil
}

// Go runs precheck (nil: none), then lets the shim start the engine. A
// shim that is gone gives ErrPreparedLost, and the scope is given up.
func (p *Prepared) Go(ctx context.Context, precheck Precheck) (*Engine, error) {
	select {
	case <-p.reaped:
		p.Abort()
		return nil, ErrPreparedLost
	default:
	}
	if precheck != nil {
		c0 := time.Now()
		err := precheck(p.scope)
		p.ph.Precheck = time.Since(c0)
		if err != nil {
			p.Abort()
			return nil, err
		}
	}
	p.ph.Ahead = time.Since(p.ready)
	return p.goAhead(ctx)
}

// Abort gives a prepared scope up: its shim is killed (it never started
// an engine) and the scope stopped. Safe to call more than once.
func (p *Prepared) Abort() {
	p.once.Do(func() {
		p.kill()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		p.r.stopUnit(ctx, p.name)
	})
}

// kill ends the shim and its pipes.
func (p *Prepared) kill() {
	p.cmd.Process.Kill()
	p.goW.Close()
	p.stR.Close()
	<-p.reaped
}

// prepare starts the shim and makes its scope; with check set,
// Spec.Precheck runs alongside.
func (r *Runtime) prepare(ctx context.Context, s Spec, check bool) (*Prepared, error) {
	t0 := time.Now()
	p := &Prepared{r: r, pool: s.Pool, name: UnitName(s.Pool), reaped: make(chan struct{}), made: make(chan struct{})}
	name := p.name
	u, err := s.account()
	if err != nil {
		return nil, fmt.Errorf("engine of pool %s: %w", s.Pool, err)
	}
	if s.Socket != "" {
		if err := os.MkdirAll(filepath.Dir(s.Socket), 0o755); err != nil {
			return nil, err
		}
	}
	if len(s.Note) > shim.MaxNote {
		return nil, fmt.Errorf("engine of pool %s: note of %d bytes over the shim's %d", s.Pool, len(s.Note), shim.MaxNote)
	}
	env, home := s.Env, u.home
	if s.CacheDir != "" {
		if err := EnsureCacheDir(s.CacheDir, u.uid, u.gid); err != nil {
			return nil, fmt.Errorf("engine of pool %s: %w", s.Pool, err)
		}
		env = append(CacheEnv(s.CacheDir, s.Env), s.Env...)
		home = s.CacheDir
	}
	spec, _ := json.Marshal(shim.Spec{Argv: s.Argv, Env: env, User: u.name, UID: u.uid, GID: u.gid, Groups: u.groups, Home: home, Socket: s.Socket, Note: s.Note, Version: s.Version})
	goR, goW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	stR, stW, err := os.Pipe()
	if err != nil {
		goR.Close()
		goW.Close()
		return nil, err
	}
	cmd := exec.Command(r.shim[0], r.shim[1:]...)
	cmd.Env = append(os.Environ(), shim.Env+"="+string(spec))
	cmd.ExtraFiles = []*os.File{goR, stW}
	cmd.Stderr = os.Stderr
	// Its own session: signals for the daemon's terminal or process group
	// are not the engine's.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = cmd.Start()
	goR.Close()
	stW.Close()
	if err != nil {
		goW.Close()
		stR.Close()
		return nil, fmt.Errorf("starting the shim: %w", err)
	}
	p.cmd, p.goW, p.stR = cmd, goW, stR
	if check {
		// The check runs alongside the scope's creation, off the start's
		// path.
		p.checked = make(chan error, 1)
		go func() {
			if s.Precheck == nil {
				p.checked <- nil
				return
			}
			// Its own time, not its wait for systemd's.
			var waited time.Duration
			scope := func() (uint64, error) {
				w0 := time.Now()
				defer func() { waited += time.Since(w0) }()
				return p.scope()
			}
			c0 := time.Now()
			err := s.Precheck(scope)
			p.ph.Precheck = time.Since(c0) - waited
			p.checked <- err
		}()
	}
	go func() {
		awaitExit(cmd.Process.Pid)
		cmd.Wait()
		if cmd.ProcessState != nil {
			p.shimStatus, _ = cmd.ProcessState.Sys().(syscall.WaitStatus)
		}
		close(p.reaped)
	}()
	abort := func(err error) (*Prepared, error) {
		p.scopeMade(0, fmt.Errorf("%s was not made: %w", name, err))
		p.kill()
		if p.checked != nil {
			<-p.checked
		}
		return nil, err
	}

	props := r.properties(s, cmd.Process.Pid)
	sd, err := r.systemd(ctx)
	if err != nil {
		return abort(err)
	}
	t1 := time.Now()
	p.ph.Shim = t1.Sub(t0)
	done := make(chan string, 1)
	var leftoverFrom time.Time
	_, err = sd.StartTransientUnitContext(ctx, name, "fail", props, done)
	if transportFailed(err) {
		// systemd re-executed since the connection was checked.
		r.drop(sd)
		if sd, err = r.systemd(ctx); err != nil {
			return abort(err)
		}
		_, err = sd.StartTransientUnitContext(ctx, name, "fail", props, done)
	}
	if isDBusError(err, "org.freedesktop.systemd1.UnitExists") {
		leftoverFrom = time.Now()
		// A scope of an earlier engine is still there (something it
		// forked, or systemd not done collecting it): stop it, then
		// create ours. Asking only when it exists keeps a round trip off
		// every restart.
		if err := r.stopUnit(ctx, name); err != nil {
			return abort(err)
		}
		_, err = sd.StartTransientUnitContext(ctx, name, "fail", props, done)
		// A stopped scope stays loaded until systemd's next garbage
		// collection (a failed one until its failure is reset).
		for wait := 5 * time.Millisecond; isDBusError(err, "org.freedesktop.systemd1.UnitExists") && wait < 2*time.Second; wait *= 2 {
			sd.ResetFailedUnitContext(ctx, name)
			select {
			case <-time.After(wait):
			case <-ctx.Done():
				return abort(ctx.Err())
			}
			_, err = sd.StartTransientUnitContext(ctx, name, "fail", props, done)
		}
	}
	if !leftoverFrom.IsZero() {
		p.ph.Leftover = time.Since(leftoverFrom)
	}
	if err != nil {
		return abort(fmt.Errorf("creating %s: %w", name, err))
	}
	if err := r.jobDone(ctx, sd, name, done); err != nil {
		return abort(err)
	}
	if delegated(s) {
		if err := delegate(cmd.Process.Pid, u.uid, u.gid); err != nil {
			_, err = abort(fmt.Errorf("engine of pool %s: %w", s.Pool, err))
			r.stopUnit(context.WithoutCancel(ctx), name)
			return nil, err
		}
	}
	// The shim is the daemon's child, not yet reaped: its pid is its own,
	// and it is in the scope now.
	id, err := sockdiag.CgroupID(cmd.Process.Pid)
	if err != nil {
		err = fmt.Errorf("the cgroup of %s: %w", name, err)
	}
	p.oom = shim.OOMFile(strconv.Itoa(cmd.Process.Pid))
	p.scopeMade(id, err)
	p.ready = time.Now()
	p.ph.Scope = p.ready.Sub(t1)
	return p, nil
}

// goAhead lets the shim start the engine and waits for its word that the
// engine runs.
func (p *Prepared) goAhead(ctx context.Context) (*Engine, error) {
	r, name, cmd := p.r, p.name, p.cmd
	ph := &p.ph
	if p.checked != nil {
		if err := <-p.checked; err != nil {
			p.kill()
			return nil, err
		}
	}
	lost := func(err error) error {
		if p.ahead {
			return fmt.Errorf("%w: %v", ErrPreparedLost, err)
		}
		return err
	}
	// Read before the engine can run, as the shim reads it.
	oomBefore := shim.OOMKills(p.oom)
	t2 := time.Now()
	if _, err := p.goW.Write([]byte{1}); err != nil {
		p.Abort()
		return nil, lost(fmt.Errorf("shim of %s: %w", name, err))
	}
	p.goW.Close()
	// systemd's InvocationID is read while the shim starts the engine:
	// one round trip less on every start (a prepared scope's was read
	// ahead).
	type invocation struct {
		id   string
		done time.Time
	}
	inv := make(chan invocation, 1)
	if p.ahead {
		inv <- invocation{p.Invocation, time.Time{}}
	} else {
		go func() {
			id := r.invocation(ctx, name)
			inv <- invocation{id, time.Now()}
		}()
	}

	rd := shim.NewReader(p.stR)
	first, err := rd.Next()
	if err != nil || first.Event != shim.EventStarted {
		vanished := err == io.EOF
		switch {
		case err == nil && first.Event == shim.EventError:
			err = errors.New(first.Error)
		case err == nil:
			err = fmt.Errorf("the shim reported %q before the engine started", first.Event)
		case err == io.EOF:
			err = errors.New("the shim ended before the engine started")
		}
		// A shim that said anything else is not waited for.
		cmd.Process.Kill()
		<-p.reaped
		p.stR.Close()
		<-inv
		r.stopUnit(context.WithoutCancel(ctx), name)
		err = fmt.Errorf("starting engine of pool %s: %w", p.pool, err)
		if vanished {
			err = lost(err)
		}
		return nil, err
	}
	t3 := time.Now()
	ph.Exec = t3.Sub(t2)
	id := <-inv
	if !id.done.IsZero() {
		ph.Invocation = max(0, id.done.Sub(t3))
	}
	e := &Engine{Unit: name, PID: first.PID, ShimPID: cmd.Process.Pid, Started: t3, Note: first.Note, events: make(chan Event, 4),
		Invocation: id.id, Phases: *ph, CgroupID: p.cgroup, oomFile: p.oom, oomBefore: oomBefore}
	e.watchDeath()
	e.shimEnded = func(wait time.Duration) (syscall.WaitStatus, bool) {
		select {
		case <-p.reaped:
			return p.shimStatus, true
		case <-time.After(wait):
			return 0, false
		}
	}
	go e.forward(rd, p.stR)
	return e, nil
}

// awaitExit returns once the child pid (not yet waited for) has exited,
// waiting on its pidfd in the runtime's poller: the shim lives as long as
// its engine, and exec.Cmd.Wait would block in waitid, holding an OS
// thread (its stack, signal stack and runtime structures, never given
// back) per running engine. Without pidfds it returns at once and the
// wait that follows blocks as before.
func awaitExit(pid int) { awaitPidfd(pid) }

// awaitPidfd waits in the runtime's poller until process pid has ended (a
// pidfd turns readable then, reaped or not, child or not). false: it could
// not be watched (no pidfd).
func awaitPidfd(pid int) bool {
	f, err := openPidfd(pid)
	if err != nil {
		return false
	}
	return awaitFile(f)
}

// openPidfd opens a non-blocking pidfd of pid, so that the runtime's
// poller waits on it.
func openPidfd(pid int) (*os.File, error) {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, err
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return os.NewFile(uintptr(fd), "pidfd"), nil
}

// awaitFile waits until the pidfd f says its process ended, and closes it.
func awaitFile(f *os.File) bool {
	defer f.Close()
	rc, err := f.SyscallConn()
	if err != nil {
		return false
	}
	ended := false
	rc.Read(func(fd uintptr) bool {
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(pfd, 0)
		if err == unix.EINTR {
			return false
		}
		ended = err == nil && n > 0
		return err != nil || ended
	})
	return ended
}

// forward turns the shim's messages into events until the exit. Anything
// but a valid fault or exit makes the shim lost: whatever sent it is not
// to be believed about the engine.
func (e *Engine) forward(rd *shim.Reader, c io.Closer) {
	defer close(e.events)
	defer c.Close()
	// A shim lost is no word on an OOM kill; the scope's counter,
	// read here while the engine (still exiting, or running) keeps the
	// scope's cgroup, is: the kernel may kill the shim itself once the
	// engine it killed is past the OOM killer's reach but its memory not
	// yet released.
	lost := func(why string) {
		e.events <- Event{Exit: &lifecycle.Exit{Lost: true, LostWhy: why, OOMKills: e.scopeOOMKills(), At: time.Now()}}
	}
	for {
		m, err := rd.Next()
		var bad *shim.ReportError
		switch {
		case err == io.EOF:
			x := &lifecycle.Exit{Lost: true, LostWhy: LostVanished, OOMKills: e.scopeOOMKills(), At: time.Now()}
			// The shim died without a word: killed with its scope
			// (systemctl kill) or alone. Its own end names the signal.
			if e.shimEnded != nil {
				if ws, ok := e.shimEnded(100 * time.Millisecond); ok && ws.Signaled() {
					x.ShimSignal = ws.Signal()
				}
			}
			e.events <- Event{Exit: x}
			return
		case errors.As(err, &bad):
			lost(bad.Why)
			return
		case err != nil:
			lost("reading the shim's reports: " + err.Error())
			return
		}
		switch m.Event {
		case shim.EventFault:
			e.events <- Event{Fault: m.Line}
		case shim.EventVersion:
			e.events <- Event{Version: m.Line, VersionErr: m.Error}
		case shim.EventExit:
			// Not waiting for the shim to be reaped: its own exit may
			// take a while (a race-detector build sleeps a second).
			e.events <- Event{Exit: &lifecycle.Exit{Status: syscall.WaitStatus(m.Status), OOMKills: m.OOMKills, At: time.Now()}}
			return
		case shim.EventError:
			lost("the shim failed: " + m.Error)
			return
		default:
			lost(fmt.Sprintf("malformed report from the shim: %q after the start", m.Event))
			return
		}
	}
}

// Attach reattaches to the shim of a pool's engine that a previous daemon
// started, through its socket; it fails when there is no such engine.
func (r *Runtime) Attach(ctx context.Context, pool, socket string) (*Engine, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, fmt.Errorf("no engine of pool %s to adopt: %w", pool, err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	rd := shim.NewReader(c)
	first, err := rd.Next()
	if err == nil && first.Event != shim.EventStarted {
		err = fmt.Errorf("it reported %q first", first.Event)
	}
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("engine of pool %s: shim did not say it runs: %w", pool, err)
	}
	c.SetReadDeadline(time.Time{})
	e := &Engine{Unit: UnitName(pool), PID: first.PID, Note: first.Note, events: make(chan Event, 4),
		Invocation: r.invocation(ctx, UnitName(pool))}
	// The shim (root, in the scope) names the engine: its cgroup is the
	// scope's.
	if p, err := OpenProcess(first.PID); err == nil {
		e.CgroupID = p.CgroupID
		p.Close()
	}
	e.watchDeath()
	if p, err := os.Stat(fmt.Sprintf("/proc/%d", first.PID)); err == nil {
		e.Started = p.ModTime()
	}
	go e.forward(rd, c)
	return e, nil
}

// Stop stops the engine's scope the systemd way: SIGTERM to every process
// in it, SIGKILL to what is left after its stop timeout. It returns when
// nothing of the engine is left.
func (r *Runtime) Stop(ctx context.Context, pool string) error {
	return r.stopUnit(ctx, UnitName(pool))
}

func (r *Runtime) stopUnit(ctx context.Context, name string) error {
	sd, err := r.systemd(ctx)
	if err != nil {
		return err
	}
	done := make(chan string, 1)
	mark := r.Witness.ExpectStop(name)
	id, err := sd.StopUnitContext(ctx, name, "replace", done)
	if err == nil {
		mark.Job(uint32(id))
	} else {
		mark.Cancel()
		if isDBusError(err, "org.freedesktop.systemd1.NoSuchUnit") {
			return nil
		}
		return fmt.Errorf("stopping %s: %w", name, err)
	}
	select {
	case res := <-done:
		if res != "done" {
			return fmt.Errorf("stopping %s: job %s", name, res)
		}
	case <-ctx.Done():
		return ctx.Err()
	}
	return nil
}

func isDBusError(err error, name string) bool {
	var de dbus.Error
	return errors.As(err, &de) && de.Name == name
}

// StopOrphans stops engine scopes of pools not in keep (pools removed from
// the configuration while no daemon ran) and returns their unit names.
func (r *Runtime) StopOrphans(ctx context.Context, keep []string) ([]string, error) {
	sd, err := r.systemd(ctx)
	if err != nil {
		return nil, err
	}
	units, err := sd.ListUnitsByPatternsContext(ctx, nil, []string{"pool-engine-*.scope"})
	if err != nil {
		return nil, err
	}
	known := map[string]bool{}
	for _, p := range keep {
		known[UnitName(p)] = true
	}
	var stopped []string
	for _, u := range units {
		if known[u.Name] || u.ActiveState == "inactive" || u.ActiveState == "failed" {
			continue
		}
		if err := r.stopUnit(ctx, u.Name); err != nil {
			return stopped, err
		}
		stopped = append(stopped, u.Name)
	}
	return stopped, nil
}

type account struct {
	name     string
	uid, gid uint32
	groups   []uint32
	home     string
}

// account resolves the engine's user (through NSS, in the daemon: the
// shim stays free of it).
func (s Spec) account() (account, error) {
	var u model.User
	var err error
	if s.Account != nil {
		u, err = s.Account()
	} else {
		u, err = model.LookupUser(s.User)
	}
	if err != nil {
		return account{}, err
	}
	a := account{name: u.Name, uid: u.UID, gid: u.GID, groups: u.Groups, home: u.Home}
	if a.home == "" {
		a.home = "/"
	}
	return a, nil
}

// ScopeProperty reads one property of a pool's scope, for status and tests.
func (r *Runtime) ScopeProperty(ctx context.Context, pool, name string) (any, error) {
	sd, err := r.systemd(ctx)
	if err != nil {
		return nil, err
	}
	p, err := sd.GetUnitTypePropertyContext(ctx, UnitName(pool), "Scope", name)
	if err != nil {
		return nil, err
	}
	return p.Value.Value(), nil
}

// invocation reads a unit's InvocationID ("" if it cannot).
func (r *Runtime) invocation(ctx context.Context, unit string) string {
	sd, err := r.systemd(ctx)
	if err != nil {
		return ""
	}
	p, err := sd.GetUnitPropertyContext(ctx, unit, "InvocationID")
	if err != nil {
		return ""
	}
	id, _ := p.Value.Value().([]byte)
	return hex.EncodeToString(id)
}
