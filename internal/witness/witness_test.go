package witness

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	sddbus "github.com/coreos/go-systemd/v22/dbus"
	"github.com/godbus/dbus/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	api "github.com/llorch/pool-managerd/dbus"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
)

// hogEnv makes the test binary allocate and touch memory until killed.
const hogEnv = "WITNESS_TEST_HOG"

func hogMain() {
	var keep [][]byte
	for {
		b := make([]byte, 1<<20)
		for i := range b {
			b[i] = 1
		}
		keep = append(keep, b)
	}
}

func newWitness(t *testing.T) *Witness {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	w, err := New(ctx)
	require.NoError(t, err)
	t.Cleanup(func() { w.Close() })
	return w
}

// watch collects a unit's events; it never blocks the witness.
func watch(t *testing.T, w *Witness, unit string) <-chan Event {
	ch := make(chan Event, 64)
	cancel := w.Watch(unit, func(e Event) {
		select {
		case ch <- e:
		default:
			t.Errorf("events of %s not read", unit)
		}
	})
	t.Cleanup(cancel)
	return ch
}

func next(t *testing.T, ch <-chan Event) Event {
	t.Helper()
	select {
	case e := <-ch:
		return e
	case <-time.After(20 * time.Second):
		t.Fatal("no event from the witness in 20s")
		return Event{}
	}
}

func quiet(t *testing.T, ch <-chan Event, d time.Duration) {
	t.Helper()
	select {
	case e := <-ch:
		t.Errorf("unexpected event %v", e)
	case <-time.After(d):
	}
}

type scope struct {
	unit string
	pid  int
	cmd  *exec.Cmd
	done chan struct{}
}

var serial atomic.Int32

// startScope runs argv in a new scope of the engines' slice, as the
// engine runtime makes them; it is gone when the test ends, also on
// failure.
func startScope(t *testing.T, name string, props []string, argv ...string) *scope {
	t.Helper()
	if name == "" {
		name = fmt.Sprintf("pool-engine-t%d-%d.scope", os.Getpid(), serial.Add(1))
	}
	args := []string{"--scope", "--quiet", "--unit=" + name, "--slice=pool-managerd-engines.slice", "-p", "CollectMode=inactive-or-failed"}
	for _, p := range props {
		args = append(args, "-p", p)
	}
	cmd := exec.Command("systemd-run", append(append(args, "--"), argv...)...)
	cmd.Stderr = os.Stderr
	require.NoError(t, cmd.Start())
	s := &scope{unit: name, pid: cmd.Process.Pid, cmd: cmd, done: make(chan struct{})}
	go func() { cmd.Wait(); close(s.done) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		exec.CommandContext(ctx, "systemctl", "stop", name).Run()
		cmd.Process.Kill()
		select {
		case <-s.done:
		case <-time.After(10 * time.Second):
			t.Errorf("%s: systemd-run (pid %d) not gone 10s after SIGKILL", name, s.pid)
		}
	})
	return s
}

// waitActive waits until systemd has made the scope (for a scope no
// witness watches).
func (s *scope) waitActive(t *testing.T) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		out, _ := exec.Command("systemctl", "is-active", s.unit).Output()
		if strings.TrimSpace(string(out)) == "active" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not active after 10s: %s", s.unit, out)
		}
	}
}

func (s *scope) waitGone(t *testing.T) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		out, _ := exec.Command("systemctl", "show", "-p", "LoadState", "--value", s.unit).Output()
		if strings.TrimSpace(string(out)) == "not-found" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still loaded after 10s: %s", s.unit, out)
		}
	}
}

func (s *scope) wait(t *testing.T) {
	t.Helper()
	select {
	case <-s.done:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: its process did not end in 10s", s.unit)
	}
}

func sleeper(t *testing.T, name string) (*scope, <-chan Event, *Witness) {
	w := newWitness(t)
	if name == "" {
		name = fmt.Sprintf("pool-engine-t%d-%d.scope", os.Getpid(), serial.Add(1))
	}
	ch := watch(t, w, name)
	s := startScope(t, name, nil, "sleep", "1000")
	e := next(t, ch)
	require.Equal(t, Started, e.Kind, "%v", e)
	require.NotEmpty(t, e.Invocation)
	return s, ch, w
}

func systemctl(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command("systemctl", args...).CombinedOutput()
	require.NoError(t, err, "systemctl %s: %s", strings.Join(args, " "), out)
}

// systemctl kill of the whole scope: systemd reports the scope dead with
// Result=success and no stop job; it cannot tell which signal.
func TestSystemctlKillOfTheScopeIsADeathWithNoStopJob(t *testing.T) {
	sandbox.Need(t)
	s, ch, _ := sleeper(t, "")
	systemctl(t, "kill", "--signal=SIGKILL", s.unit)
	e := next(t, ch)
	assert.Equal(t, Dead, e.Kind, "%v", e)
	assert.Equal(t, Emptied, e.Cause)
	assert.Equal(t, "inactive", e.ActiveState)
	assert.Equal(t, "dead", e.SubState)
	assert.Equal(t, "success", e.Result)
	assert.Zero(t, e.Job)
	e = next(t, ch)
	assert.Equal(t, Removed, e.Kind, "%v", e)
	assert.Equal(t, NoCause, e.Cause, "a death already told is no vanishing")
}

func TestOperatorsSystemctlStopIsAnOperatorStop(t *testing.T) {
	sandbox.Need(t)
	s, ch, _ := sleeper(t, "")
	systemctl(t, "stop", s.unit)
	e := next(t, ch)
	assert.Equal(t, Stopping, e.Kind, "%v", e)
	assert.Equal(t, OperatorStop, e.Cause)
	assert.Equal(t, "stop-sigterm", e.SubState)
	assert.NotZero(t, e.Job)
	e = next(t, ch)
	assert.Equal(t, Dead, e.Kind, "%v", e)
	assert.Equal(t, OperatorStop, e.Cause)
	assert.Equal(t, "inactive", e.ActiveState)
	e = next(t, ch)
	assert.Equal(t, Removed, e.Kind, "%v", e)
}

// The daemon's own stop, announced before StopUnit as engine.Runtime
// would; the announcement is used up, so the next scope of the same name
// stopped by the operator is the operator's.
func TestAStopAnnouncedByTheDaemonIsOursAndOnlyThatOne(t *testing.T) {
	sandbox.Need(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	name := fmt.Sprintf("pool-engine-ours%d.scope", os.Getpid())
	s, ch, w := sleeper(t, name)
	sd, err := sddbus.NewSystemConnectionContext(ctx)
	require.NoError(t, err)
	defer sd.Close()

	stop := w.ExpectStop(s.unit)
	done := make(chan string, 1)
	id, err := sd.StopUnitContext(ctx, s.unit, "replace", done)
	require.NoError(t, err)
	stop.Job(uint32(id))
	require.Equal(t, "done", <-done)
	e := next(t, ch)
	assert.Equal(t, Stopping, e.Kind, "%v", e)
	assert.Equal(t, OurStop, e.Cause)
	assert.Equal(t, uint32(id), e.Job)
	e = next(t, ch)
	assert.Equal(t, Dead, e.Kind, "%v", e)
	assert.Equal(t, OurStop, e.Cause)
	assert.Equal(t, Removed, next(t, ch).Kind)

	startScope(t, name, nil, "sleep", "1000")
	require.Equal(t, Started, next(t, ch).Kind)
	systemctl(t, "stop", name)
	e = next(t, ch)
	assert.Equal(t, Stopping, e.Kind, "%v", e)
	assert.Equal(t, OperatorStop, e.Cause, "the daemon's announcement covered its own stop only")
}

// A scope not named pool-engine-*.scope, in the same slice, gives no event
// and leaves nothing in the witness, even to a watcher of its name.
func TestAScopeOfAnotherNameGivesNoEvent(t *testing.T) {
	sandbox.Need(t)
	w := newWitness(t)
	other := fmt.Sprintf("other-t%d.scope", os.Getpid())
	otherCh := watch(t, w, other)
	o := startScope(t, other, nil, "sleep", "1000")
	o.waitActive(t)
	systemctl(t, "kill", "--signal=SIGKILL", o.unit)
	o.wait(t)
	// The name is free only once systemd has collected the first scope:
	// else the second's systemd-run fails while the first still shows
	// active.
	o.waitGone(t)
	o2 := startScope(t, other, nil, "sleep", "1000")
	o2.waitActive(t)
	systemctl(t, "stop", o2.unit)

	// A scope of ours after it: its events come after any of the other's.
	ours := fmt.Sprintf("pool-engine-after%d.scope", os.Getpid())
	ch := watch(t, w, ours)
	s := startScope(t, ours, nil, "sleep", "1000")
	require.Equal(t, Started, next(t, ch).Kind)
	systemctl(t, "kill", "--signal=SIGKILL", s.unit)
	require.Equal(t, Dead, next(t, ch).Kind)
	quiet(t, otherCh, 0)
	w.mu.Lock()
	_, tracked := w.units[other]
	w.mu.Unlock()
	assert.False(t, tracked)
}

// A MemoryMax= scope running something that allocates until the kernel
// kills it. On this hybrid host (cgroup v1 memory controller) systemd
// sees only the processes gone: Result=success. Under cgroup v2 it reports
// Result=oom-kill.
func TestAnOOMKillUnderMemoryMaxIsWhatSystemdReports(t *testing.T) {
	sandbox.Need(t)
	w := newWitness(t)
	name := fmt.Sprintf("pool-engine-oom%d.scope", os.Getpid())
	ch := watch(t, w, name)
	exe, err := os.Executable()
	require.NoError(t, err)
	s := startScope(t, name, []string{"MemoryMax=20M", "MemorySwapMax=0"}, "env", hogEnv+"=1", exe)
	require.Equal(t, Started, next(t, ch).Kind)
	e := next(t, ch)
	s.wait(t)
	ws := s.cmd.ProcessState.Sys().(syscall.WaitStatus)
	require.True(t, ws.Signaled() && ws.Signal() == syscall.SIGKILL, "the kernel's OOM killer ended it: %v", s.cmd.ProcessState)
	_, err = os.Stat("/sys/fs/cgroup/cgroup.controllers")
	unified := err == nil
	t.Logf("OOM kill under MemoryMax=20M (cgroup v2 unified: %v): %v", unified, e)
	assert.Equal(t, Dead, e.Kind)
	if unified {
		assert.Equal(t, OOMKilled, e.Cause)
		assert.Equal(t, "oom-kill", e.Result)
	} else {
		assert.Equal(t, Emptied, e.Cause)
		assert.Equal(t, "success", e.Result)
	}
}

// Signals forged by an unprivileged user with systemd's paths and members
// (the system bus lets anyone send signals) are ignored.
func TestForgedSignalsFromAnotherUserAreIgnored(t *testing.T) {
	sandbox.Need(t)
	s, ch, w := sleeper(t, "")
	path := unitPathPrefix + api.PathEncode(s.unit)

	// A listener of its own proves the forgeries were on the bus.
	spy, err := dbus.ConnectSystemBus()
	require.NoError(t, err)
	defer spy.Close()
	require.NoError(t, spy.AddMatchSignal(dbus.WithMatchMember("PropertiesChanged"), dbus.WithMatchObjectPath(dbus.ObjectPath(path))))
	require.NoError(t, spy.AddMatchSignal(dbus.WithMatchMember("JobRemoved"), dbus.WithMatchArg(2, s.unit)))
	require.NoError(t, spy.AddMatchSignal(dbus.WithMatchMember("UnitRemoved"), dbus.WithMatchArg(0, s.unit)))
	require.NoError(t, spy.AddMatchSignal(dbus.WithMatchMember("Reloading"), dbus.WithMatchObjectPath(systemdPath)))
	spied := make(chan *dbus.Signal, 16)
	spy.Signal(spied)

	forge := func(args ...string) {
		out, err := exec.Command("setpriv", append([]string{"--reuid=" + forger, "--regid=" + forger, "--init-groups", "--", "busctl", "--system", "emit"}, args...)...).CombinedOutput()
		require.NoError(t, err, "busctl emit %v: %s", args, out)
	}
	forge(path, "org.freedesktop.DBus.Properties", "PropertiesChanged", "sa{sv}as", scopeIface, "1", "Result", "s", "oom-kill", "0")
	forge(path, "org.freedesktop.DBus.Properties", "PropertiesChanged", "sa{sv}as", unitIface, "3", "ActiveState", "s", "failed", "SubState", "s", "failed", "Job", "(uo)", "0", "/", "0")
	forge(string(systemdPath), manager, "JobRemoved", "uoss", "999", "/org/freedesktop/systemd1/job/999", s.unit, "done")
	forge(string(systemdPath), manager, "UnitRemoved", "so", s.unit, path)
	// A forged reload would have the scope's real UnitRemoved held.
	forge(string(systemdPath), manager, "Reloading", "b", "true")
	for range 5 {
		select {
		case sig := <-spied:
			w.mu.Lock()
			assert.NotEqual(t, w.systemd, sig.Sender)
			w.mu.Unlock()
		case <-time.After(10 * time.Second):
			t.Fatal("the forged signals did not reach the bus")
		}
	}
	// The real death after them is the next event.
	systemctl(t, "kill", "--signal=SIGKILL", s.unit)
	e := next(t, ch)
	assert.Equal(t, Dead, e.Kind, "%v", e)
	assert.Equal(t, Emptied, e.Cause)
	assert.Equal(t, "success", e.Result, "not the forged oom-kill")
	e = next(t, ch)
	assert.Equal(t, Removed, e.Kind, "not held for a forged reload: %v", e)
}

// systemd unloads every unit during a daemon-reload and a daemon-reexec
// and tells UnitRemoved of each, running scopes included: no event, and
// the scope's later end is told as ever.
func TestADaemonReloadOrReexecIsNoEndOfAScope(t *testing.T) {
	sandbox.Need(t)
	s, ch, w := sleeper(t, "")
	for _, verb := range []string{"daemon-reload", "daemon-reload", "daemon-reexec", "daemon-reload"} {
		systemctl(t, verb)
	}
	// The reexec's new systemd is believed.
	require.Eventually(t, func() bool {
		var owner string
		if w.conn.BusObject().Call(busDriver+".GetNameOwner", 0, systemdName).Store(&owner) != nil {
			return false
		}
		w.mu.Lock()
		defer w.mu.Unlock()
		return owner == w.systemd && !w.reloading
	}, 10*time.Second, 10*time.Millisecond)
	quiet(t, ch, time.Second)
	systemctl(t, "kill", "--signal=SIGKILL", s.unit)
	e := next(t, ch)
	assert.Equal(t, Dead, e.Kind, "%v", e)
	assert.Equal(t, Emptied, e.Cause)
	e = next(t, ch)
	assert.Equal(t, Removed, e.Kind, "%v", e)
	assert.Equal(t, NoCause, e.Cause)
	quiet(t, ch, 500*time.Millisecond)
}

// A scope whose process ends while systemd reloads is told dead once,
// whether systemd's word comes as signals or as the answer the witness
// asks for after the reload.
func TestAScopeThatEndsDuringAReloadIsToldOnce(t *testing.T) {
	sandbox.Need(t)
	for i := range 5 {
		s, ch, _ := sleeper(t, "")
		reload := exec.Command("systemctl", "daemon-reload")
		require.NoError(t, reload.Start())
		time.Sleep(time.Duration(i) * 5 * time.Millisecond)
		require.NoError(t, syscall.Kill(s.pid, syscall.SIGKILL))
		require.NoError(t, reload.Wait())
		e := next(t, ch)
		assert.Equal(t, Dead, e.Kind, "round %d: %v", i, e)
		assert.Equal(t, Emptied, e.Cause, "round %d", i)
		e = next(t, ch)
		assert.Equal(t, Removed, e.Kind, "round %d: %v", i, e)
		assert.Equal(t, NoCause, e.Cause, "round %d", i)
		quiet(t, ch, 300*time.Millisecond)
	}
}

// What the witness asks of a scope after a reload: its state as a
// signal would tell it, and a unit systemd no longer has as removed.
func TestAskReadsAScopesStateFromSystemd(t *testing.T) {
	sandbox.Need(t)
	s, ch, w := sleeper(t, "")
	obs, ok := w.ask(s.unit)
	require.True(t, ok)
	require.Len(t, obs, 1)
	assert.Equal(t, obsUnit, obs[0].kind)
	assert.Equal(t, "active", obs[0].active)
	assert.Equal(t, "running", obs[0].sub)
	w.mu.Lock()
	inv := w.units[s.unit].invocation
	w.mu.Unlock()
	assert.Equal(t, inv, obs[0].invocation)

	obs, ok = w.ask(fmt.Sprintf("pool-engine-none%d.scope", os.Getpid()))
	require.True(t, ok)
	assert.Equal(t, []observation{{kind: obsUnitRemoved}}, obs)
	systemctl(t, "kill", "--signal=SIGKILL", s.unit)
	require.Equal(t, Dead, next(t, ch).Kind)
}

// How long from a SIGKILL of the scope's only process to the witness's
// event, and how much of it is systemd's own (its StateChangeTimestamp).
func TestLatencyFromSIGKILLToTheWitness(t *testing.T) {
	sandbox.Need(t)
	w := newWitness(t)
	const rounds = 20
	var total, own []time.Duration
	for i := range rounds {
		name := fmt.Sprintf("pool-engine-lat%d-%d.scope", os.Getpid(), i)
		ch := watch(t, w, name)
		s := startScope(t, name, nil, "sleep", "1000")
		require.Equal(t, Started, next(t, ch).Kind)
		t0 := time.Now()
		require.NoError(t, syscall.Kill(s.pid, syscall.SIGKILL))
		e := next(t, ch)
		require.Equal(t, Dead, e.Kind, "%v", e)
		total = append(total, e.At.Sub(t0))
		own = append(own, e.Changed.Sub(t0))
	}
	slices.Sort(total)
	slices.Sort(own)
	t.Logf("SIGKILL -> witness event, %d rounds: median %v, p90 %v, max %v; SIGKILL -> systemd's state change: median %v, p90 %v, max %v",
		rounds, total[rounds/2], total[rounds*9/10], total[rounds-1], own[rounds/2], own[rounds*9/10], own[rounds-1])
	assert.Less(t, total[rounds/2], time.Second)
}

// Close ends delivery and the connection; Err stays nil.
func TestCloseEndsTheWitness(t *testing.T) {
	sandbox.Need(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	w, err := New(ctx)
	require.NoError(t, err)
	require.NoError(t, w.Close())
	select {
	case <-w.Done():
	default:
		t.Fatal("not done after Close")
	}
	assert.NoError(t, w.Err())
}
