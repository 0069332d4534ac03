package engine_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/engine"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/shim"
	"github.com/llorch/pool-managerd/internal/sockdiag"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
)

func TestMain(m *testing.M) {
	if shim.Is() {
		os.Exit(shim.Main())
	}
	if pid := os.Getenv(signalEnv); pid != "" {
		os.Exit(signalMain(pid))
	}
	os.Exit(sandbox.Main(m, sandbox.Options{
		Nodes: sandbox.FakeGPUs,
		Prepare: [][]string{{"useradd", "--system", "--no-create-home", "pool-engine"},
			// A host whose default would leave an OOM-killed engine
			// half running: the scope's own OOMPolicy must win.
			{"sh", "-c", `mkdir -p /etc/systemd/system.conf.d && printf '[Manager]\nDefaultOOMPolicy=continue\n' > /etc/systemd/system.conf.d/oom.conf && systemctl daemon-reexec`}},
	}, nil))
}

func runtime(t *testing.T) (*engine.Runtime, context.Context) {
	t.Helper()
	sandbox.Need(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	exe, err := os.Executable()
	require.NoError(t, err)
	rt, err := engine.New(ctx, []string{exe})
	require.NoError(t, err)
	t.Cleanup(rt.Close)
	return rt, ctx
}

func journal(t *testing.T, unit string, want string) string {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		out, _ := exec.Command("journalctl", "-u", unit, "--no-pager", "-o", "cat").CombinedOutput()
		if strings.Contains(string(out), want) {
			return string(out)
		}
		if time.Now().After(deadline) {
			t.Fatalf("journalctl -u %s does not show %q:\n%s", unit, want, out)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// The very first thing the engine does already happens inside its scope,
// as its user, without new privileges: there is no window outside.
func TestEngineStartsInsideItsScope(t *testing.T) {
	rt, ctx := runtime(t)
	t0 := time.Now()
	e, err := rt.Start(ctx, engine.Spec{
		Pool:        "first-light",
		Argv:        []string{"/bin/sh", "-c", `echo "cgroup $(cat /proc/self/cgroup | tail -n 1)"; echo "uid $(id -u) $(grep NoNewPrivs /proc/self/status)"; echo "env $GREETING $CUDA_VISIBLE_DEVICES"; exit 7`},
		Env:         []string{"GREETING=hello", "CUDA_VISIBLE_DEVICES=GPU-x"},
		User:        "pool-engine",
		DeviceNodes: []string{"/dev/nvidia0"},
		StopTimeout: 2 * time.Second,
	})
	require.NoError(t, err)
	assert.Equal(t, "pool-engine-first\\x2dlight.scope", e.Unit, "unit names are escaped the systemd way")
	// The start's phases, for the journal and make bench.
	ph := e.Phases
	assert.Positive(t, ph.Shim)
	assert.Positive(t, ph.Scope)
	assert.Positive(t, ph.Exec)
	assert.Zero(t, ph.Leftover, "no earlier scope of the name")
	assert.WithinRange(t, e.Started, t0, time.Now())
	assert.NotEmpty(t, e.Invocation, "read alongside the engine's exec")
	var exit *lifecycle.Exit
	for ev := range e.Events() {
		if ev.Exit != nil {
			exit = ev.Exit
		}
	}
	require.NotNil(t, exit)
	assert.True(t, exit.Status.Exited())
	assert.Equal(t, 7, exit.Status.ExitStatus())
	out := journal(t, e.Unit, "env hello")
	assert.Contains(t, out, "/pool-managerd-engines.slice/pool-engine-first\\x2dlight.scope")
	uid, err := exec.Command("id", "-u", "pool-engine").Output()
	require.NoError(t, err)
	assert.Contains(t, out, "uid "+strings.TrimSpace(string(uid))+" NoNewPrivs:\t1")
	assert.Contains(t, out, "env hello GPU-x")
	require.NoError(t, rt.Stop(ctx, "first-light"))
}

func TestBadUserFailsCleanly(t *testing.T) {
	rt, ctx := runtime(t)
	_, err := rt.Start(ctx, engine.Spec{Pool: "nobody-here", Argv: []string{"/bin/true"}, User: "no-such-user", StopTimeout: time.Second})
	require.Error(t, err)
	assert.Contains(t, err.Error(), `user "no-such-user"`)
	out, _ := exec.Command("systemctl", "is-active", "pool-engine-nobody\\x2dhere.scope").CombinedOutput()
	assert.NotEqual(t, "active", strings.TrimSpace(string(out)), "nothing is left running")
}

// The engine gets stdin, stdout and stderr and nothing else: not the
// shim's pipes to the daemon, not a descriptor the daemon leaked.
func TestEngineInheritsOnlyStdio(t *testing.T) {
	rt, ctx := runtime(t)
	leak, err := unix.Dup(2) // dup(2) leaves close-on-exec off: the shim inherits it
	require.NoError(t, err)
	defer unix.Close(leak)
	e, err := rt.Start(ctx, engine.Spec{Pool: "stdio-only", Argv: []string{"/bin/sleep", "60"}, User: "pool-engine", StopTimeout: 2 * time.Second})
	require.NoError(t, err)
	t.Cleanup(func() { rt.Stop(context.Background(), "stdio-only") })
	// Right after its exec the dynamic loader may hold a library open for
	// a moment: an inherited descriptor stays.
	var fds []string
	for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", e.PID))
		require.NoError(t, err)
		fds = fds[:0]
		for _, d := range ents {
			fds = append(fds, d.Name())
		}
		if len(fds) == 3 || time.Now().After(deadline) {
			break
		}
	}
	assert.Equal(t, []string{"0", "1", "2"}, fds)
}

// An engine that writes a forged exit report to every descriptor it might
// have reaches no one: no exit is reported and it keeps running.
func TestForgedExitReportIsNotBelieved(t *testing.T) {
	rt, ctx := runtime(t)
	forge := `for fd in $(seq 3 20); do (eval "echo '{\"event\":\"exit\",\"status\":0}' >&$fd") 2>/dev/null; done; echo forged; exec sleep 60`
	e, err := rt.Start(ctx, engine.Spec{Pool: "forger", Argv: []string{"/bin/sh", "-c", forge}, User: "pool-engine", StopTimeout: 2 * time.Second})
	require.NoError(t, err)
	t.Cleanup(func() { rt.Stop(context.Background(), "forger") })
	journal(t, e.Unit, "forged")
	select {
	case ev, ok := <-e.Events():
		t.Fatalf("the daemon heard %+v (open %v) from a running engine", ev, ok)
	case <-time.After(2 * time.Second):
	}
	assert.NoError(t, unix.Kill(e.PID, 0), "the engine still runs")

	require.NoError(t, rt.Stop(ctx, "forger"))
	select {
	case ev := <-e.Events():
		require.NotNil(t, ev.Exit)
		assert.False(t, ev.Exit.Lost)
		assert.Equal(t, syscall.SIGTERM, ev.Exit.Status.Signal(), "the real exit")
	case <-time.After(10 * time.Second):
		t.Fatal("no exit after the stop")
	}
}

// Attach reads a shim's socket no further than one bounded message.
func TestAttachRefusesAnEndlessReport(t *testing.T) {
	rt, ctx := runtime(t)
	sock := filepath.Join(t.TempDir(), "shim.sock")
	l, err := net.Listen("unix", sock)
	require.NoError(t, err)
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		chunk := bytes.Repeat([]byte("x"), 1<<20)
		for range 256 {
			if _, err := c.Write(chunk); err != nil {
				return
			}
		}
		time.Sleep(10 * time.Second)
	}()
	start := time.Now()
	_, err = rt.Attach(ctx, "endless", sock)
	require.Error(t, err)
	assert.Contains(t, err.Error(), fmt.Sprintf("over %d bytes", shim.MaxMessage))
	assert.Less(t, time.Since(start), 3*time.Second, "refused at once, not at the read deadline")
}

// An engine's scope stops as a whole on an OOM kill (systemd reports
// Result=oom-kill) unless the pool's [Scope] says otherwise, whatever
// DefaultOOMPolicy= the host sets.
func TestScopeOOMPolicyIsStopUnlessThePoolSetsIt(t *testing.T) {
	rt, ctx := runtime(t)
	for _, tc := range []struct {
		pool  string
		scope []config.ScopeProperty
		want  string
	}{
		{pool: "oom-default", want: "stop"},
		{pool: "oom-continue", scope: []config.ScopeProperty{{Key: "OOMPolicy", Raw: "continue", Name: "OOMPolicy", Value: "continue"}}, want: "continue"},
	} {
		e, err := rt.Start(ctx, engine.Spec{Pool: tc.pool, Argv: []string{"/bin/sleep", "30"}, User: "pool-engine",
			StopTimeout: 2 * time.Second, Scope: tc.scope})
		require.NoError(t, err)
		out, err := exec.Command("systemctl", "show", "-P", "OOMPolicy", e.Unit).Output()
		require.NoError(t, err)
		assert.Equal(t, tc.want, strings.TrimSpace(string(out)), tc.pool)
		// The engine knows its scope's invocation: systemd's word on an
		// earlier scope of the same name is told apart by it.
		inv, err := exec.Command("systemctl", "show", "-P", "InvocationID", e.Unit).Output()
		require.NoError(t, err)
		assert.NotEmpty(t, e.Invocation)
		assert.Equal(t, strings.TrimSpace(string(inv)), e.Invocation)
		require.NoError(t, rt.Stop(ctx, tc.pool))
	}
}

// Delegate=yes gives the scope's cgroup (the directory and the files that
// make and fill cgroups beneath it) to the engine's user: the engine can
// then split its scope as podman run --cgroups=split does, while a process
// of the same user outside the scope still cannot move in. Without it the
// cgroup is root's alone and the engine cannot split it.
func TestADelegatedScopeIsTheEnginesUsers(t *testing.T) {
	rt, ctx := runtime(t)
	u, err := user.Lookup("pool-engine")
	require.NoError(t, err)
	root, err := sockdiag.CgroupDir("/")
	require.NoError(t, err)
	// The engine moves itself to a cgroup beneath its scope if it may.
	split := []string{"/bin/sh", "-c", `d=$1$(sed -n 's/^0:://p' /proc/self/cgroup); mkdir "$d/payload" && echo $$ >"$d/payload/cgroup.procs"; exec sleep 30`, "sh", root}
	delegate := []config.ScopeProperty{{Key: "Delegate", Raw: "yes", Name: "Delegate", Value: true}}
	for _, tc := range []struct {
		pool  string
		scope []config.ScopeProperty
		owner string
	}{
		{pool: "undelegated", owner: "0"},
		{pool: "delegated", scope: delegate, owner: u.Uid},
	} {
		e, err := rt.Start(ctx, engine.Spec{Pool: tc.pool, Argv: split, User: "pool-engine", StopTimeout: 2 * time.Second, Scope: tc.scope})
		require.NoError(t, err)
		out, err := exec.Command("systemctl", "show", "-P", "ControlGroup", e.Unit).Output()
		require.NoError(t, err)
		cg := strings.TrimSpace(string(out))
		dir, err := sockdiag.CgroupDir(cg)
		require.NoError(t, err)
		for _, f := range []string{"", "cgroup.procs", "cgroup.threads", "cgroup.subtree_control"} {
			fi, err := os.Stat(filepath.Join(dir, f))
			require.NoError(t, err)
			assert.Equal(t, tc.owner, fmt.Sprint(fi.Sys().(*syscall.Stat_t).Uid), "%s: owner of %s/%s", tc.pool, dir, f)
		}
		fi, err := os.Stat(filepath.Join(dir, "memory.max"))
		if err == nil {
			assert.Equal(t, uint32(0), fi.Sys().(*syscall.Stat_t).Uid, "%s: the scope's limits stay root's", tc.pool)
		}
		want := "0::" + cg + "\n"
		if tc.owner != "0" {
			want = "0::" + cg + "/payload\n"
		}
		assert.Eventually(t, func() bool {
			b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", e.PID))
			return strings.HasSuffix(string(b), want)
		}, 10*time.Second, 20*time.Millisecond, "%s: the engine's cgroup is %q", tc.pool, want)
		if tc.owner != "0" {
			// The same user from outside the scope: the common ancestor
			// is not the user's.
			out, err := exec.Command("setpriv", "--reuid=pool-engine", "--regid=pool-engine", "--clear-groups", "--",
				"sh", "-c", `echo $$ >"$1/payload/cgroup.procs"`, "sh", dir).CombinedOutput()
			assert.Error(t, err, "a process of the engine's user outside the scope moved into it: %s", out)
		}
		require.NoError(t, rt.Stop(ctx, tc.pool))
	}
}

// The runtime talks to systemd on its private socket, which a re-executing
// systemd closes: the next start connects again.
func TestStartAfterSystemdReexecutes(t *testing.T) {
	rt, ctx := runtime(t)
	spec := engine.Spec{Pool: "reexec", Argv: []string{"/bin/sleep", "1000"}, User: "pool-engine", StopTimeout: time.Second}
	e, err := rt.Start(ctx, spec)
	require.NoError(t, err)
	require.True(t, rt.Private(), "systemd's private socket, as systemctl uses")
	require.NoError(t, rt.Stop(ctx, "reexec"))
	for range e.Events() {
	}
	out, err := exec.Command("systemctl", "daemon-reexec").CombinedOutput()
	require.NoError(t, err, "%s", out)
	e, err = rt.Start(ctx, spec)
	require.NoError(t, err, "a start right after systemd re-executed")
	assert.NotEmpty(t, e.Invocation)
	assert.True(t, rt.Private(), "connected again to the private socket")
	require.NoError(t, rt.Stop(ctx, "reexec"))
}

// A scope of the pool's name that is still there (something an earlier
// engine forked) is stopped before the new engine's is made; the time it
// took is the start's Leftover.
func TestALeftoverScopeOfThePoolsNameIsStoppedFirst(t *testing.T) {
	rt, ctx := runtime(t)
	left := exec.Command("systemd-run", "--scope", "--quiet", "--unit="+engine.UnitName("leftover"), "/bin/sleep", "1000")
	require.NoError(t, left.Start())
	t.Cleanup(func() { left.Process.Kill() })
	require.Eventually(t, func() bool {
		out, _ := exec.Command("systemctl", "is-active", engine.UnitName("leftover")).Output()
		return strings.TrimSpace(string(out)) == "active"
	}, 10*time.Second, 20*time.Millisecond)
	e, err := rt.Start(ctx, engine.Spec{Pool: "leftover", Argv: []string{"/bin/sleep", "1000"}, User: "pool-engine", StopTimeout: time.Second})
	require.NoError(t, err)
	assert.Positive(t, e.Phases.Leftover)
	assert.GreaterOrEqual(t, e.Phases.Scope, e.Phases.Leftover)
	done := make(chan error, 1)
	go func() { done <- left.Wait() }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the leftover scope's process still runs")
	}
	require.NoError(t, rt.Stop(ctx, "leftover"))
}

// A precheck that fails calls the start off: no engine runs, and the
// scope made meanwhile goes with its shim.
func TestAFailedPrecheckRunsNoEngine(t *testing.T) {
	rt, ctx := runtime(t)
	mark := markFile(t)
	busy := errors.New("GPU in use by pid 4242")
	_, err := rt.Start(ctx, engine.Spec{Pool: "prechecked", Argv: []string{"/bin/touch", mark}, User: "pool-engine", StopTimeout: time.Second,
		Precheck: func(func() (uint64, error)) error { return busy }})
	require.ErrorIs(t, err, busy)
	_, statErr := os.Stat(mark)
	assert.True(t, os.IsNotExist(statErr), "the engine never ran")
	require.Eventually(t, func() bool {
		out, _ := exec.Command("systemctl", "is-active", engine.UnitName("prechecked")).Output()
		return strings.TrimSpace(string(out)) != "active"
	}, 10*time.Second, 20*time.Millisecond, "the scope goes with its shim")
}

// markFile is a path the engine's user may create: an engine that ran
// leaves it (a test's own temporary directory is root's alone).
func markFile(t *testing.T) string {
	d, err := os.MkdirTemp("/var/tmp", "engine-mark")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(d) })
	require.NoError(t, os.Chmod(d, 0o777))
	return filepath.Join(d, "ran")
}

func scopeActive(unit string) bool {
	out, _ := exec.Command("systemctl", "is-active", unit).Output()
	return strings.TrimSpace(string(out)) == "active"
}

// A prepared scope holds a shim and no engine until Go: the engine then
// runs in that very scope, with the InvocationID read ahead, and its
// check runs right before it.
func TestAPreparedScopeRunsItsEngineOnlyAtGo(t *testing.T) {
	rt, ctx := runtime(t)
	mark := markFile(t)
	p, err := rt.Prepare(ctx, engine.Spec{Pool: "ahead", Argv: []string{"/bin/sh", "-c", "touch " + mark + "; exec sleep 1000"}, User: "pool-engine", StopTimeout: time.Second})
	require.NoError(t, err)
	unit := engine.UnitName("ahead")
	assert.True(t, scopeActive(unit), "the scope is made")
	assert.Regexp(t, "^[0-9a-f]{32}$", p.Invocation)
	time.Sleep(50 * time.Millisecond)
	_, statErr := os.Stat(mark)
	assert.True(t, os.IsNotExist(statErr), "no engine before Go")

	var scope uint64
	e, err := p.Go(ctx, func(own func() (uint64, error)) error {
		var err error
		scope, err = own()
		return err
	})
	require.NoError(t, err)
	require.NotZero(t, scope, "the check is given the scope's cgroup")
	assert.Equal(t, scope, e.CgroupID)
	assert.Equal(t, p.Invocation, e.Invocation)
	assert.GreaterOrEqual(t, e.Phases.Ahead, 50*time.Millisecond)
	require.Eventually(t, func() bool { _, err := os.Stat(mark); return err == nil }, 10*time.Second, 10*time.Millisecond)
	cg, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", e.PID))
	require.NoError(t, err)
	assert.Contains(t, string(cg), unit)
	engineCgroup, err := sockdiag.CgroupID(e.PID)
	require.NoError(t, err)
	assert.Equal(t, engineCgroup, scope, "the scope's cgroup is the engine's")
	require.NoError(t, rt.Stop(ctx, "ahead"))
}

// Abort gives a prepared scope up: its shim goes, the scope with it, and
// no engine ever ran.
func TestAnAbortedPreparedScopeRunsNoEngine(t *testing.T) {
	rt, ctx := runtime(t)
	mark := markFile(t)
	p, err := rt.Prepare(ctx, engine.Spec{Pool: "given-up", Argv: []string{"/bin/touch", mark}, User: "pool-engine", StopTimeout: time.Second})
	require.NoError(t, err)
	p.Abort()
	p.Abort()
	assert.False(t, scopeActive(engine.UnitName("given-up")))
	_, err = p.Go(ctx, nil)
	require.ErrorIs(t, err, engine.ErrPreparedLost)
	_, statErr := os.Stat(mark)
	assert.True(t, os.IsNotExist(statErr), "the engine never ran")
}

// A prepared scope stopped or killed by someone else while it waits is
// lost: Go says so (the caller starts afresh) and runs nothing; a failed
// check at Go gives the scope up too.
func TestAPreparedScopeLostOrRefusedAtGoRunsNoEngine(t *testing.T) {
	rt, ctx := runtime(t)
	for _, how := range [][]string{{"stop"}, {"kill", "--signal=SIGKILL"}} {
		t.Run(how[0], func(t *testing.T) {
			mark := markFile(t)
			p, err := rt.Prepare(ctx, engine.Spec{Pool: "lost-" + how[0], Argv: []string{"/bin/touch", mark}, User: "pool-engine", StopTimeout: time.Second})
			require.NoError(t, err)
			unit := engine.UnitName("lost-" + how[0])
			out, err := exec.Command("systemctl", append(how, unit)...).CombinedOutput()
			require.NoError(t, err, "%s", out)
			require.Eventually(t, func() bool { return !scopeActive(unit) }, 10*time.Second, 10*time.Millisecond)
			// The shim may be reaped a moment after its scope ends.
			var goErr error
			require.Eventually(t, func() bool {
				_, goErr = p.Go(ctx, nil)
				return goErr != nil
			}, 10*time.Second, 10*time.Millisecond)
			require.ErrorIs(t, goErr, engine.ErrPreparedLost)
			_, statErr := os.Stat(mark)
			assert.True(t, os.IsNotExist(statErr), "the engine never ran")
		})
	}
	mark := markFile(t)
	p, err := rt.Prepare(ctx, engine.Spec{Pool: "refused", Argv: []string{"/bin/touch", mark}, User: "pool-engine", StopTimeout: time.Second})
	require.NoError(t, err)
	busy := errors.New("GPU in use by pid 4242")
	_, err = p.Go(ctx, func(func() (uint64, error)) error { return busy })
	require.ErrorIs(t, err, busy)
	require.Eventually(t, func() bool { return !scopeActive(engine.UnitName("refused")) }, 10*time.Second, 10*time.Millisecond)
	_, statErr := os.Stat(mark)
	assert.True(t, os.IsNotExist(statErr), "the engine never ran")
}

// The kernel says an engine ended (its pidfd), once, whether OnDied was
// set before the end or after it; the shim's report comes too.
func TestTheKernelSaysAnEngineDied(t *testing.T) {
	rt, ctx := runtime(t)
	for _, late := range []bool{false, true} {
		pool := fmt.Sprintf("pidfd-%v", late)
		e, err := rt.Start(ctx, engine.Spec{Pool: pool, Argv: []string{"/bin/sleep", "1000"}, User: "pool-engine", StopTimeout: time.Second})
		require.NoError(t, err)
		t.Cleanup(func() { rt.Stop(context.Background(), pool) })
		var calls atomic.Int32
		died := make(chan struct{}, 2)
		onDied := func() {
			calls.Add(1)
			died <- struct{}{}
		}
		if !late {
			e.OnDied(onDied)
		}
		kill := time.Now()
		require.NoError(t, syscall.Kill(e.PID, syscall.SIGKILL))
		select {
		case ev := <-e.Events():
			require.NotNil(t, ev.Exit)
			assert.Equal(t, syscall.SIGKILL, ev.Exit.Status.Signal())
		case <-time.After(10 * time.Second):
			t.Fatal("no report from the shim")
		}
		if late {
			e.OnDied(onDied)
		}
		select {
		case <-died:
			assert.Less(t, time.Since(kill), 10*time.Second)
		case <-time.After(10 * time.Second):
			t.Fatalf("no word from the kernel (OnDied set late: %v)", late)
		}
		// Nothing else is pending: the watcher has ended and told once.
		assert.Equal(t, int32(1), calls.Load())
	}
}

// The kernel may OOM-kill the shim too: where it cannot be exempted (no
// CAP_SYS_RESOURCE), once the engine it killed is past the OOM killer's
// reach but its memory not yet released, a page the shim touches makes it
// the only candidate. The scope's OOM count still comes with the lost
// shim's exit, read by the daemon from outside the scope.
func TestAShimLostAfterAnOOMKillInItsScopeStillTellsTheOOMKill(t *testing.T) {
	rt, ctx := runtime(t)
	mem := []config.ScopeProperty{{Key: "MemoryMax", Raw: "32M", Name: "MemoryMax", Value: uint64(32 << 20)}}
	e, err := rt.Start(ctx, engine.Spec{Pool: "oom-shim-lost", User: "pool-engine", StopTimeout: time.Second, Scope: mem,
		// tail -c keeps what it is told in memory: the OOM killer's
		// victim in the scope (first in line by its oom_score_adj, before
		// the shim, a race build that may be larger), while the engine
		// itself lives on.
		Argv: []string{"/bin/sh", "-c", "head -c 100000000 /dev/zero | (echo 1000 >/proc/self/oom_score_adj && exec tail -c 90000000 >/dev/null); exec sleep 60"}})
	require.NoError(t, err)
	t.Cleanup(func() { rt.Stop(context.Background(), "oom-shim-lost") })
	counter := shim.OOMFile(strconv.Itoa(e.ShimPID))
	require.NotEmpty(t, counter, "the scope has a memory cgroup")
	require.Eventually(t, func() bool { return shim.OOMKills(counter) == 1 }, 20*time.Second, 20*time.Millisecond, "tail OOM-killed")
	require.NoError(t, syscall.Kill(e.ShimPID, syscall.SIGKILL))
	select {
	case ev := <-e.Events():
		require.NotNil(t, ev.Exit)
		assert.True(t, ev.Exit.Lost, "the shim never reported")
		assert.Equal(t, uint64(1), ev.Exit.OOMKills, "the scope's OOM kill, read from outside it")
	case <-time.After(10 * time.Second):
		t.Fatal("no word of the shim's end")
	}
}
