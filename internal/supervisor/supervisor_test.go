package supervisor_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	sddbus "github.com/coreos/go-systemd/v22/dbus"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/crash"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/shim"
	"github.com/llorch/pool-managerd/internal/sockdiag"
	. "github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

func TestMain(m *testing.M) {
	if shim.Is() {
		os.Exit(shim.Main())
	}
	os.Exit(sandbox.Main(m, testpool.Options, sandbox.Build(testpool.Sim)))
}

func ready(n int) func(Snapshot) bool { return testpool.ReadyAfter(n) }

func waitFor(t *testing.T, p *testpool.Pool, what string, cond func(Snapshot) bool) Snapshot {
	t.Helper()
	s, err := p.Wait(what, cond)
	require.NoError(t, err)
	return s
}

func get(t *testing.T, port int, path string, out any) {
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d%s", port, path))
	require.NoError(t, err)
	defer resp.Body.Close()
	require.NoError(t, json.NewDecoder(resp.Body).Decode(out))
}

func sh(t *testing.T, name string, args ...string) string {
	out, err := exec.Command(name, args...).CombinedOutput()
	require.NoError(t, err, "%s %v: %s", name, args, out)
	return string(out)
}

func TestScopeIsolationUserAndJournal(t *testing.T) {
	e := testpool.New(t, nil)
	s := e.Pool("iso", "0", "", "")
	snap := waitFor(t, s, "ready", ready(1))
	assert.Equal(t, "pool-engine-iso.scope", snap.Unit)

	show := sh(t, "systemctl", "show", "-p", "Slice,DevicePolicy,DeviceAllow,ActiveState", snap.Unit)
	assert.Contains(t, show, "Slice=pool-managerd-engines.slice")
	assert.Contains(t, show, "DevicePolicy=closed")
	assert.Contains(t, show, "DeviceAllow=/dev/nvidia0 rw")
	assert.Contains(t, show, "DeviceAllow=/dev/nvidiactl rw")
	assert.NotContains(t, show, "/dev/nvidia1")
	assert.Contains(t, show, "ActiveState=active")

	var devs map[string]string
	get(t, s.Port, "/sim/devices", &devs)
	assert.Equal(t, map[string]string{"/dev/nvidia0": "ENXIO", "/dev/nvidiactl": "ENXIO", "/dev/nvidia1": "EPERM"}, devs)

	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", snap.MainPID))
	require.NoError(t, err)
	uid := poolUID(t, e, "iso")
	assert.Contains(t, string(status), "Uid:\t"+uid+"\t", "the pool's own user")
	assert.Contains(t, string(status), "NoNewPrivs:\t1")
	environ, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", snap.MainPID))
	require.NoError(t, err)
	assert.Contains(t, string(environ), "CUDA_VISIBLE_DEVICES=GPU-8f2c1a70-0000-4000-8000-000000000000\x00")
	assert.Contains(t, string(environ), "NVIDIA_VISIBLE_DEVICES=GPU-8f2c1a70-0000-4000-8000-000000000000\x00")
	// HOME and the caches in the pool's own cache directory, the
	// engine's to write.
	cache := filepath.Join(e.Dir, "cache", "iso")
	for _, v := range []string{"HOME=" + cache, "XDG_CACHE_HOME=" + cache + "/.cache", "HF_HOME=" + cache + "/.cache/huggingface",
		"VLLM_CACHE_ROOT=" + cache + "/.cache/vllm", "TRITON_CACHE_DIR=" + cache + "/.triton/cache"} {
		assert.Contains(t, string(environ), "\x00"+v+"\x00")
	}
	fi, err := os.Stat(cache)
	require.NoError(t, err)
	assert.Equal(t, os.ModeDir|0o700, fi.Mode())
	assert.Equal(t, uid, fmt.Sprint(fi.Sys().(*syscall.Stat_t).Uid))

	// The engine's own lines, under its scope.
	require.Eventually(t, func() bool {
		out, _ := exec.Command("journalctl", "-u", snap.Unit, "--no-pager", "-o", "cat").CombinedOutput()
		return strings.Contains(string(out), "server is listening on http://127.0.0.1") &&
			strings.Contains(string(out), "GET /health")
	}, 20*time.Second, 100*time.Millisecond)
}

// splitEngine does what podman run --cgroups=split does to its scope: it
// moves itself to a cgroup beneath the scope (runtime) and runs the engine
// in another (payload).
const splitEngine = `#!/bin/sh
d=$CGROOT$(sed -n 's/^0:://p' /proc/self/cgroup)
mkdir "$d/runtime" "$d/payload" || exit 90
echo $$ >"$d/runtime/cgroup.procs" || exit 91
sh -c 'echo $$ >"$0/payload/cgroup.procs" && exec "$@"' "$d" "$@" &
wait $!
`

// An engine that splits its delegated scope (podman run --cgroups=split:
// the engine's own process beneath the scope, the server in another
// cgroup beneath it) is Ready, its listener being the scope's; a crash of
// the server is seen and restarted.
func TestAnEngineThatSplitsItsScopeIsReady(t *testing.T) {
	e := testpool.New(t, nil)
	root, err := sockdiag.CgroupDir("/")
	require.NoError(t, err)
	wrap := filepath.Join(e.Dir, "split-engine")
	require.NoError(t, os.WriteFile(wrap, []byte(splitEngine), 0o755))
	s := e.Start(testpool.Spec{ID: "split", Devices: "0", Wrap: wrap,
		Engine: "Version=sim-1\nStopTimeoutSec=2\nEnvironment=CGROOT=" + root + "\n", Extra: "[Scope]\nDelegate=yes\n"})
	snap := waitFor(t, s, "ready", ready(1))
	cg := strings.TrimSpace(sh(t, "systemctl", "show", "-P", "ControlGroup", snap.Unit))
	self, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", snap.MainPID))
	require.NoError(t, err)
	assert.True(t, strings.HasSuffix(string(self), "0::"+cg+"/runtime\n"), "the engine's process moved beneath its scope: %s", self)
	owners, err := sockdiag.ListenerOwners(netip.MustParseAddr("127.0.0.1"), uint16(s.Port))
	require.NoError(t, err)
	require.Len(t, owners, 1)
	where, err := sockdiag.CgroupPathOfID(owners[0].CgroupID)
	require.NoError(t, err)
	assert.Equal(t, cg+"/payload", where, "the listener is the payload's")

	require.NoError(t, s.Fault("segv"))
	crashed := waitFor(t, s, "the crash", func(s Snapshot) bool { return s.Policy.CrashCount == 1 })
	assert.Contains(t, crashed.LastError, "status 139", "the wrapper's exit: the server's SIGSEGV")
	waitFor(t, s, "ready again", ready(2))
}

func TestFaultsAreClassifiedAndRestarted(t *testing.T) {
	sandbox.Need(t)
	cases := []struct {
		kind   string
		reason crash.Reason
		errHas string
		extra  string
	}{
		{"segv", crash.Signal, "SIGSEGV", ""},
		{"exit:3", crash.ExitCode, "exited with status 3", ""},
		{"cuda", crash.CUDAError, "CUDA error: an illegal memory access was encountered", "Multiplier=cuda_error:2\n"},
		{"oom", crash.OutOfMemory, "out of memory", "[Scope]\nMemoryMax=64M\n"},
		{"hang-health", crash.HealthCheck, "health check failed 3 times", ""},
	}
	for _, c := range cases {
		t.Run(c.kind, func(t *testing.T) {
			e := testpool.New(t, nil)
			id := "f" + strings.NewReplacer(":", "", "-", "").Replace(c.kind)
			s := e.Pool(id, "0", "", c.extra)
			first := waitFor(t, s, "ready", ready(1))
			require.NoError(t, s.Fault(c.kind))
			crashed := waitFor(t, s, "the crash", func(s Snapshot) bool { return s.Policy.CrashCount == 1 })
			assert.False(t, crashed.Ready)
			assert.Equal(t, c.reason, crashed.LastReason)
			assert.Contains(t, crashed.LastError, c.errHas)
			if c.reason == crash.HealthCheck {
				assert.Len(t, crashed.HealthFailures, 3, "each failure has its timestamp")
			}
			again := waitFor(t, s, "ready again", ready(2))
			assert.NotEqual(t, first.MainPID, again.MainPID)
			assert.Equal(t, uint64(1), again.Policy.RestartCount)
			want := 200 * time.Millisecond
			if c.reason == crash.CUDAError {
				want *= 2
			}
			got, err := metricSum(e.Reg, "pool_managerd_backoff_delay_seconds")
			require.NoError(t, err)
			assert.InDelta(t, want.Seconds(), got, 1e-9, "backoff delay")
		})
	}
}

func TestExitZeroIsNotRestarted(t *testing.T) {
	e := testpool.New(t, nil)
	s := e.Pool("clean", "0", "", "")
	waitFor(t, s, "ready", ready(1))
	require.NoError(t, s.Fault("exit:0"))
	snap := waitFor(t, s, "stopped", func(s Snapshot) bool { return s.State == lifecycle.Stopped })
	assert.Zero(t, snap.Policy.CrashCount)
	assert.False(t, snap.Live)
	assert.Equal(t, 1, snap.Starts)
}

func TestStopEscalatesAndLeavesNothing(t *testing.T) {
	e := testpool.New(t, nil)
	s := e.Pool("stubborn", "1", "", "")
	snap := waitFor(t, s, "ready", ready(1))
	require.NoError(t, s.Fault("ignore-term"))
	require.NoError(t, s.Fault("fork-child"))
	pids := sh(t, "systemctl", "show", "-p", "ControlGroup", "--value", snap.Unit)
	require.NotEmpty(t, strings.TrimSpace(pids))
	start := time.Now()
	require.NoError(t, s.Stop(e.Ctx))
	assert.GreaterOrEqual(t, time.Since(start), 2*time.Second, "SIGTERM was ignored: SIGKILL came after StopTimeoutSec")
	assert.Equal(t, lifecycle.Stopped, s.Snapshot().State)
	assert.Zero(t, s.Snapshot().Policy.CrashCount, "a requested stop is not a crash")
	out, _ := exec.Command("systemctl", "is-active", snap.Unit).CombinedOutput()
	assert.NotEqual(t, "active", strings.TrimSpace(string(out)))
	out, _ = exec.Command("pgrep", "-f", "pool-engine-sim").CombinedOutput()
	assert.Empty(t, strings.TrimSpace(string(out)), "no engine process or child survives")
}

func TestBreakerOpensAndPoolFails(t *testing.T) {
	e := testpool.New(t, nil)
	s := e.Pool("loop", "0", "--fault exit:1 --fault-after 300ms", "BreakerThreshold=3\n")
	snap := waitFor(t, s, "failed", func(s Snapshot) bool { return s.State == lifecycle.Failed })
	assert.Equal(t, uint64(3), snap.Policy.CrashCount)
	assert.Equal(t, "open", snap.Policy.Breaker.String())
	assert.Equal(t, 3, snap.Starts)
	assert.False(t, snap.NextRestart.IsZero(), "it says when the breaker lets a test through")
	assert.Greater(t, time.Until(snap.NextRestart), 200*time.Second)
}

func metricSum(g prometheus.Gatherer, name string) (float64, error) {
	fams, err := g.Gather()
	if err != nil {
		return 0, err
	}
	for _, f := range fams {
		if f.GetName() == name {
			sum := 0.0
			for _, m := range f.GetMetric() {
				sum += m.GetHistogram().GetSampleSum()
			}
			return sum, nil
		}
	}
	return 0, fmt.Errorf("no %s", name)
}

func TestXIDEventRestartsTheEngine(t *testing.T) {
	e := testpool.New(t, nil)
	s := e.Pool("xid", "0", "", "")
	first := waitFor(t, s, "ready", ready(1))
	s.XID("GPU-8f2c1a70-0000-4000-8000-000000000000", 79)
	crashed := waitFor(t, s, "the crash", func(s Snapshot) bool { return s.Policy.CrashCount == 1 })
	assert.Equal(t, crash.DriverXID, crashed.LastReason)
	assert.Contains(t, crashed.LastError, "Xid 79")
	again := waitFor(t, s, "ready again", ready(2))
	assert.NotEqual(t, first.MainPID, again.MainPID)
}

func TestLeasesUnderConcurrency(t *testing.T) {
	e := testpool.New(t, nil)
	s := e.Pool("leases", "0", "", "[Pool]\nSlots=8\n")
	waitFor(t, s, "ready", ready(1))
	var wg sync.WaitGroup
	var granted, refused atomic.Int64
	for g := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			owner := fmt.Sprintf("router-%d", g%4)
			for range 50 {
				id, err := s.AcquireLease(owner)
				if err != nil {
					require.ErrorIs(t, err, lifecycle.ErrNoCapacity)
					refused.Add(1)
					continue
				}
				granted.Add(1)
				assert.LessOrEqual(t, s.Snapshot().ActiveLeases, uint32(8), "never more than Slots=")
				require.NoError(t, s.ReleaseLease(id))
				assert.ErrorIs(t, s.ReleaseLease(id), lifecycle.ErrNoSuchLease, "a second release changes nothing")
			}
		}()
	}
	wg.Wait()
	assert.Equal(t, int64(16*50), granted.Load()+refused.Load())
	assert.Positive(t, granted.Load())
	assert.Zero(t, s.Snapshot().ActiveLeases)

	// All of one owner's leases go at once.
	for range 3 {
		_, err := s.AcquireLease("conn-a")
		require.NoError(t, err)
	}
	_, err := s.AcquireLease("conn-b")
	require.NoError(t, err)
	assert.Equal(t, 3, s.ReleaseOwner("conn-a"))
	assert.Equal(t, uint32(1), s.Snapshot().ActiveLeases)
	pool, ok := LeasePool("leases/0123")
	assert.True(t, ok)
	assert.Equal(t, "leases", pool)
}

func TestLeaseRefusals(t *testing.T) {
	e := testpool.New(t, nil)
	s := e.Pool("refusals", "0", "--load-time 2s", "")
	_, err := s.AcquireLease("r")
	assert.ErrorIs(t, err, lifecycle.ErrNotReady, "not ready while the model loads")
	waitFor(t, s, "ready", ready(1))
	_, err = s.AcquireLease("r")
	require.NoError(t, err)
	go s.Drain(e.Ctx, time.Minute)
	waitFor(t, s, "draining", func(p Snapshot) bool { return p.Draining })
	_, err = s.AcquireLease("r")
	assert.ErrorIs(t, err, lifecycle.ErrDraining)
}

func TestCountersSurviveARestartOfTheDaemon(t *testing.T) {
	e := testpool.New(t, nil)
	s := e.Pool("persist", "0", "", "BreakerThreshold=2\n")
	waitFor(t, s, "ready", ready(1))
	require.NoError(t, s.Fault("exit:1"))
	waitFor(t, s, "ready again", ready(2))
	require.NoError(t, s.Fault("exit:1"))
	failed := waitFor(t, s, "failed", func(p Snapshot) bool { return p.State == lifecycle.Failed })
	assert.Equal(t, "open", failed.Policy.Breaker.String())

	// A new supervisor of the same pool, as after a daemon restart.
	again := e.Start(testpool.Spec{ID: "persist", Devices: "0", Extra: "BreakerThreshold=2\n", NoStart: true})
	snap := again.Snapshot()
	assert.Equal(t, uint64(2), snap.Policy.CrashCount)
	assert.Equal(t, uint64(1), snap.Policy.RestartCount)
	assert.Equal(t, "open", snap.Policy.Breaker.String())
	assert.ErrorIs(t, again.Start(), lifecycle.ErrBreakerOpen, "a daemon restart is no way around the breaker")
	assert.Equal(t, lifecycle.Failed, again.Snapshot().State)
}

func TestDrainCancelsScheduledRestart(t *testing.T) {
	e := testpool.New(t, nil)
	s := e.Pool("cancel", "0", "", "BackoffInitialSec=1\nBackoffMinSec=1\n")
	waitFor(t, s, "ready", ready(1))
	require.NoError(t, s.Fault("exit:1"))
	crashed := waitFor(t, s, "backoff", func(p Snapshot) bool { return p.State == lifecycle.Backoff })
	res, err := s.Drain(e.Ctx, time.Minute)
	require.NoError(t, err)
	assert.Equal(t, lifecycle.Drained, res.Outcome)
	// Past the moment the restart was due, nothing was started.
	ctx, cancel := context.WithDeadline(e.Ctx, crashed.NextRestart.Add(500*time.Millisecond))
	defer cancel()
	_, err = s.Supervisor.Wait(ctx, func(p Snapshot) bool { return p.Starts > 1 })
	assert.ErrorIs(t, err, context.DeadlineExceeded, "no restart sneaks in after a drain")
	assert.Equal(t, lifecycle.Stopped, s.Snapshot().State)
}

func TestReloadIsBusyWhileReloading(t *testing.T) {
	e := testpool.New(t, nil)
	s := e.Pool("busy", "0", "", "")
	waitFor(t, s, "ready", ready(1))
	lease, err := s.AcquireLease("router")
	require.NoError(t, err)
	other := e.WriteModel("other.gguf", "GGUF\x03\x00\x00\x00 other")
	done := make(chan error, 1)
	go func() {
		_, err := s.Reload(e.Ctx, other, time.Minute)
		done <- err
	}()
	waitFor(t, s, "draining", func(p Snapshot) bool { return p.Draining })
	_, err = s.Reload(e.Ctx, other, time.Minute)
	assert.ErrorIs(t, err, lifecycle.ErrBusy)
	_, err = s.Drain(e.Ctx, time.Minute)
	assert.ErrorIs(t, err, lifecycle.ErrBusy)
	require.NoError(t, s.ReleaseLease(lease))
	require.NoError(t, <-done)
	_, err = s.Reload(e.Ctx, "../escape.gguf", time.Minute)
	assert.ErrorIs(t, err, lifecycle.ErrInvalidArgument)
	assert.Equal(t, "other.gguf", filepath.Base(s.Snapshot().Model), "a bad ref changes nothing")
}

// Like systemctl stop, Stop returns once nothing of the engine's scope
// runs: its shim reports the engine's exit before it leaves the scope
// itself, and systemd ends the scope a few milliseconds later. Asked at
// once over the bus (systemctl show takes longer than that window), the
// scope is inactive every time.
func TestStopReturnsOnceTheScopeIsGone(t *testing.T) {
	e := testpool.New(t, nil)
	sd, err := sddbus.NewSystemConnectionContext(e.Ctx)
	require.NoError(t, err)
	defer sd.Close()
	s := e.Pool("gone", "0", "", "")
	for i := range 5 {
		snap := waitFor(t, s, "ready", ready(i+1))
		require.NoError(t, s.Stop(e.Ctx))
		p, err := sd.GetUnitPropertyContext(e.Ctx, snap.Unit, "ActiveState")
		require.NoError(t, err)
		assert.Equal(t, `"inactive"`, p.Value.String(), "stop %d", i+1)
		assert.Equal(t, lifecycle.Stopped, s.Snapshot().State)
		require.NoError(t, s.Start())
	}
}
