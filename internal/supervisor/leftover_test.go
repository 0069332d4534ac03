package supervisor_test

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/engine"
	"github.com/llorch/pool-managerd/internal/gpu"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	. "github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

const gpu0 = "GPU-8f2c1a70-0000-4000-8000-000000000000"

// sleeper runs sleep for d as user ("" for the test's own), a plain child
// of the test; gone is closed once it has ended. It is killed when the
// test ends.
func sleeper(t *testing.T, user string, d time.Duration) (*exec.Cmd, <-chan struct{}) {
	t.Helper()
	args := []string{"sleep", strconv.Itoa(int(d.Seconds()))}
	if user != "" {
		args = append([]string{"setpriv", "--reuid=" + user, "--regid=nogroup", "--clear-groups", "--"}, args...)
	}
	cmd := exec.Command(args[0], args[1:]...)
	require.NoError(t, cmd.Start())
	gone := make(chan struct{})
	go func() { cmd.Wait(); close(gone) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		select {
		case <-gone:
		case <-time.After(5 * time.Second):
		}
	})
	return cmd, gone
}

// cgroup2 is where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup,
// or /sys/fs/cgroup/unified on a hybrid host).
func cgroup2(t *testing.T) string {
	t.Helper()
	if _, err := os.Stat("/sys/fs/cgroup/unified/cgroup.procs"); err == nil {
		return "/sys/fs/cgroup/unified"
	}
	return "/sys/fs/cgroup"
}

// cgroupRoot is the directory of the cgroups of this sandbox's systemd.
func cgroupRoot(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("/proc/1/cgroup")
	require.NoError(t, err)
	for _, l := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(l, "0::"); ok {
			return filepath.Join(cgroup2(t), filepath.Dir(p))
		}
	}
	t.Fatal("no cgroup v2 here")
	return ""
}

// moveTo puts pid into the cgroup directory dir.
func moveTo(t *testing.T, dir string, pid int) {
	t.Helper()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0o644))
}

// intoScope waits (while the start makes it) for the pool's scope and
// puts pid into its cgroup, as a leftover of an earlier engine of the
// pool would be (a process gone meanwhile stays out). It runs in the
// pool's check, not on the test's goroutine.
func intoScope(t *testing.T, root, pool string, pid int) {
	unit := engine.UnitName(pool)
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		out, _ := exec.Command("systemctl", "show", "-P", "ControlGroup", unit).Output()
		if cg := strings.TrimSpace(string(out)); cg != "" {
			for _, dir := range []string{filepath.Join(root, cg), filepath.Join("/sys/fs/cgroup/unified", cg), filepath.Join("/sys/fs/cgroup", cg)} {
				if _, err := os.Stat(filepath.Join(dir, "cgroup.procs")); err == nil {
					err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0o644)
					if err != nil && !errors.Is(err, syscall.ESRCH) {
						t.Errorf("moving pid %d into %s: %v", pid, dir, err)
					}
					return
				}
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Errorf("the scope %s was not made", unit)
}

// A leftover in the pool's own scope (told by the scope's cgroup, not by
// a unit name) is killed through its pidfd and waited for before the
// engine starts.
func TestALeftoverOfThePoolsOwnScopeIsKilledBeforeTheStart(t *testing.T) {
	sandbox.Need(t)
	leftover, gone := sleeper(t, "", time.Minute)
	root := cgroupRoot(t)
	calls := 0
	e := testpool.New(t, nil)
	p := e.Start(testpool.Spec{ID: "own", Devices: "0", NoStart: true, Holders: func() ([]GPUHolder, error) {
		calls++
		select {
		case <-gone:
			return nil, nil
		default:
		}
		intoScope(t, root, "own", leftover.Process.Pid)
		return []GPUHolder{{GPU: gpu0, PID: leftover.Process.Pid, Command: "sleep"}}, nil
	}})
	require.NoError(t, p.Start())
	select {
	case <-gone:
	case <-time.After(time.Second):
		t.Fatal("the leftover still runs after the start")
	}
	assert.Equal(t, syscall.SIGKILL, leftover.ProcessState.Sys().(syscall.WaitStatus).Signal())
	assert.Equal(t, 1, calls)
	waitFor(t, p, "ready", ready(1))
}

// A process in a scope named like the pool's but elsewhere (the way
// systemd-run --user --scope --unit=pool-engine-X names one in a user's
// manager) is not the pool's: it is not signalled, and it holds the start
// as any other process would.
func TestAScopeNamedLikeThePoolsElsewhereIsForeign(t *testing.T) {
	sandbox.Need(t)
	unit := engine.UnitName("named")
	dir := filepath.Join(cgroupRoot(t), "user.slice", "user-65534.slice", "user@65534.service", "app.slice", unit)
	require.NoError(t, os.MkdirAll(dir, 0o755))
	impostor, gone := sleeper(t, "nobody", time.Minute)
	t.Cleanup(func() {
		impostor.Process.Kill()
		<-gone
		for d := dir; d != cgroupRoot(t); d = filepath.Dir(d) {
			os.Remove(d)
		}
	})
	moveTo(t, dir, impostor.Process.Pid)
	cg, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", impostor.Process.Pid))
	require.NoError(t, err)
	require.Contains(t, string(cg), "/app.slice/"+unit, "its unit is named like the pool's")

	e := testpool.New(t, nil)
	p := e.Start(testpool.Spec{ID: "named", Devices: "0", NoStart: true, GPURetry: 300 * time.Millisecond, Holders: func() ([]GPUHolder, error) {
		select {
		case <-gone:
			return nil, nil
		default:
		}
		return []GPUHolder{{GPU: gpu0, PID: impostor.Process.Pid, Command: "sleep", Unit: unit}}, nil
	}})
	err = p.Start()
	require.ErrorIs(t, err, lifecycle.ErrGPUBusy)
	s := p.Snapshot()
	assert.Equal(t, lifecycle.Failed, s.State)
	pid := strconv.Itoa(impostor.Process.Pid)
	assert.Contains(t, s.LastError, "pid "+pid+" (sleep, uid 65534, cgroup ")
	assert.Contains(t, s.LastError, "user@65534.service/app.slice/"+unit+"), outside "+unit)
	assert.Zero(t, s.Policy.CrashCount)
	time.Sleep(500 * time.Millisecond)
	select {
	case <-gone:
		t.Fatal("the daemon killed a process that is not the pool's")
	default:
	}
	// Held while it runs: each retry (every GPURetry) finds it again.
	require.Eventually(t, func() bool { return p.Snapshot().State == lifecycle.Failed }, 5*time.Second, 10*time.Millisecond, "held while it runs")
	assert.Contains(t, p.Snapshot().LastError, "pid "+pid+" (sleep, uid 65534, cgroup ")

	require.NoError(t, impostor.Process.Kill())
	<-gone
	got := waitFor(t, p, "ready once it is gone", ready(1))
	assert.Zero(t, got.Policy.CrashCount)
}

// noKillEnv runs a test in a copy of the test binary without CAP_KILL,
// as the daemon runs (its unit's CapabilityBoundingSet= has none).
const noKillEnv = "SUPERVISOR_TEST_NO_CAP_KILL"

// withoutCapKill runs the calling test again in a process without
// CAP_KILL and reports whether the caller is that process (then it goes
// on with the test); the caller returns when it is not.
func withoutCapKill(t *testing.T) bool {
	t.Helper()
	sandbox.Need(t)
	if os.Getenv(noKillEnv) == "1" {
		b, err := os.ReadFile("/proc/self/status")
		require.NoError(t, err)
		for _, l := range strings.Split(string(b), "\n") {
			if hex, ok := strings.CutPrefix(l, "CapEff:"); ok {
				caps, err := strconv.ParseUint(strings.TrimSpace(hex), 16, 64)
				require.NoError(t, err)
				require.Zero(t, caps&(1<<5), "CAP_KILL is dropped")
			}
		}
		return true
	}
	exe, err := os.Executable()
	require.NoError(t, err)
	cmd := exec.Command("setpriv", "--bounding-set=-kill", "--inh-caps=-kill", "--", exe, "-test.run=^"+t.Name()+"$", "-test.count=1", "-test.v", "-test.timeout=3m")
	cmd.Env = append(os.Environ(), noKillEnv+"=1")
	out, err := cmd.CombinedOutput()
	t.Logf("without CAP_KILL:\n%s", out)
	require.NoError(t, err)
	require.Contains(t, string(out), "--- PASS: "+t.Name())
	return false
}

// A process in the pool's own scope that the daemon cannot signal (no
// CAP_KILL, another uid) is foreign: the start does not go ahead beside
// it, LastError names it, and no crash is counted. Once it is gone (the
// next try stops the old scope through systemd) the pool starts.
func TestALeftoverThatCannotBeSignalledHoldsTheStart(t *testing.T) {
	if !withoutCapKill(t) {
		return
	}
	stuck, gone := sleeper(t, "nobody", time.Minute)
	root := cgroupRoot(t)
	e := testpool.New(t, nil)
	p := e.Start(testpool.Spec{ID: "stuck", Devices: "0", NoStart: true, GPURetry: 300 * time.Millisecond, Holders: func() ([]GPUHolder, error) {
		select {
		case <-gone:
			return nil, nil
		default:
		}
		intoScope(t, root, "stuck", stuck.Process.Pid)
		return []GPUHolder{{GPU: gpu0, PID: stuck.Process.Pid, Command: "sleep"}}, nil
	}})
	err := p.Start()
	require.ErrorIs(t, err, lifecycle.ErrGPUBusy)
	assert.ErrorContains(t, err, "cannot signal")
	s := p.Snapshot()
	assert.Equal(t, lifecycle.Failed, s.State)
	assert.Contains(t, s.LastError, fmt.Sprintf("pid %d (sleep, uid 65534, cgroup ", stuck.Process.Pid))
	assert.Contains(t, s.LastError, "/"+engine.UnitName("stuck")+") in "+engine.UnitName("stuck")+", which the daemon cannot signal")
	assert.Zero(t, s.Policy.CrashCount)
	assert.Zero(t, s.Starts, "no engine beside it")
	select {
	case <-gone:
		t.Fatal("an EPERM was taken for its death")
	default:
	}
	got := waitFor(t, p, "ready once it is gone", ready(1))
	assert.Zero(t, got.Policy.CrashCount)
	<-gone
}

// A check of the GPU's holders that could not look at every process says
// so in LastError; the engine still starts (every other user's process
// is such with the static inventory and no CAP_SYS_PTRACE).
func TestAnIncompleteGPUCheckIsTheLastError(t *testing.T) {
	e := testpool.New(t, nil)
	p := e.Start(testpool.Spec{ID: "blind", Devices: "0", NoStart: true, Holders: func() ([]GPUHolder, error) {
		return nil, &gpu.UncheckedError{N: 3}
	}})
	require.NoError(t, p.Start())
	s := waitFor(t, p, "ready", ready(1))
	assert.Contains(t, s.LastError, "could not check 3 processes of other users")
}

// A process in the scope of a pool of the group parked asleep (the
// system manager's scope of that pool, told by its whole cgroup path) is
// no holder: a sleeping vLLM keeps its process, and little memory, on the
// GPU. The same process holds the start while its pool is not asleep.
func TestASleepingPeersEngineDoesNotHoldTheStart(t *testing.T) {
	sandbox.Need(t)
	dir := filepath.Join(cgroup2(t), engine.ScopeCgroup("peer"))
	require.NoError(t, os.MkdirAll(dir, 0o755))
	asleep, gone := sleeper(t, "nobody", time.Minute)
	t.Cleanup(func() {
		asleep.Process.Kill()
		<-gone
		os.Remove(dir)
	})
	moveTo(t, dir, asleep.Process.Pid)
	holders := func() ([]GPUHolder, error) {
		return []GPUHolder{{GPU: gpu0, PID: asleep.Process.Pid, Command: "python3", Unit: engine.UnitName("peer")}}, nil
	}
	e := testpool.New(t, nil)
	awake := e.Start(testpool.Spec{ID: "other", Devices: "0", NoStart: true, Holders: holders, GPURetry: time.Minute,
		Asleep: func() []string { return nil }})
	require.ErrorIs(t, awake.Start(), lifecycle.ErrGPUBusy, "not asleep: it holds the GPU")

	p := e.Start(testpool.Spec{ID: "turn", Devices: "1", NoStart: true, Holders: holders,
		Asleep: func() []string { return []string{"peer"} }})
	require.NoError(t, p.Start())
	waitFor(t, p, "ready beside the sleeping peer", ready(1))
	select {
	case <-gone:
		t.Fatal("the sleeping peer's engine was killed")
	default:
	}
}
