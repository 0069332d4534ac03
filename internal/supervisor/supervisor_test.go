package supervisor

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/crash"
	"github.com/llorch/pool-managerd/internal/engine"
	"github.com/llorch/pool-managerd/internal/gpu"
	"github.com/llorch/pool-managerd/internal/metrics"
)

const manager = `[Inventory]
Backend=static
Device=0 GPU-8f2c1a70-0000-4000-8000-000000000000 /dev/nvidia0
Device=1 GPU-8f2c1a70-0000-4000-8000-000000000001 /dev/nvidia1
ControlDevice=/dev/nvidiactl
ControlDevice=/dev/nvidia-uvm
`

// env is one test's pools on one runtime.
type env struct {
	t   *testing.T
	ctx context.Context
	rt  *engine.Runtime
	inv *gpu.Inventory
	dir string
	reg *prometheus.Registry
	m   *metrics.Set
	log *slog.Logger
}

func newEnv(t *testing.T) *env {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	exe, err := os.Executable()
	require.NoError(t, err)
	rt, err := engine.New(ctx, []string{exe})
	require.NoError(t, err)
	t.Cleanup(rt.Close)
	dir, err := os.MkdirTemp("", "pool-test-")
	require.NoError(t, err)
	require.NoError(t, os.Chmod(dir, 0o755))
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "pools.d"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pool-managerd.conf"), []byte(manager), 0o644))
	model := filepath.Join(dir, "model.gguf")
	require.NoError(t, os.WriteFile(model, []byte("GGUF\x03\x00\x00\x00 a tiny model"), 0o644))
	reg := prometheus.NewRegistry()
	return &env{t: t, ctx: ctx, rt: rt, dir: dir, reg: reg, m: metrics.New(reg),
		log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))}
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// pool writes a pool file running the simulator and starts its supervisor.
func (e *env) pool(id, devices, simArgs, extra string) (*Supervisor, int) {
	t := e.t
	port := freePort(t)
	text := fmt.Sprintf(`[Pool]
Devices=%s
Model=%s
[Engine]
ExecStart=%s --model %%m --port %%p %s --probe-devices /dev/nvidia0,/dev/nvidia1,/dev/nvidiactl
Port=%d
StopTimeoutSec=2
Version=sim-1
[Health]
IntervalSec=0.2
TimeoutSec=0.2
FailureThreshold=3
StartTimeoutSec=20
[Restart]
BackoffInitialSec=0.2
BackoffMinSec=0.1
BackoffMaxSec=2
JitterPercent=0
%s`, devices, filepath.Join(e.dir, "model.gguf"), os.Getenv("POOL_ENGINE_SIM"), simArgs, port, extra)
	file := filepath.Join(e.dir, "pools.d", id+".pool")
	require.NoError(t, os.WriteFile(file, []byte(text), 0o644))
	c, err := config.Load(e.dir)
	require.NoError(t, err)
	var p *config.Pool
	for _, x := range c.Pools {
		if x.ID == id {
			p = x
		}
	}
	if e.inv == nil {
		e.inv, err = gpu.Load(c.Manager.Inventory, gpu.NewNVML(), "/dev")
		require.NoError(t, err)
	}
	cfg, err := FromPool(p, e.inv, ModelPath(p.Model, c.Manager.ModelsDir))
	require.NoError(t, err)
	s := New(cfg, e.rt, e.log, e.m)
	ctx, cancel := context.WithCancel(e.ctx)
	go s.Run(ctx)
	t.Cleanup(func() {
		sctx, scancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer scancel()
		assert.NoError(t, s.Stop(sctx))
		cancel()
	})
	require.NoError(t, s.Start())
	return s, port
}

func (e *env) waitState(s *Supervisor, what string, cond func(Snapshot) bool) Snapshot {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(e.ctx, 60*time.Second)
	defer cancel()
	snap, err := s.Wait(ctx, cond)
	require.NoError(e.t, err, "waiting for %s", what)
	return snap
}

func ready(n int) func(Snapshot) bool {
	return func(s Snapshot) bool { return s.Ready && s.Starts >= n }
}

func get(t *testing.T, port int, path string, out any) {
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d%s", port, path))
	require.NoError(t, err)
	defer resp.Body.Close()
	require.NoError(t, json.NewDecoder(resp.Body).Decode(out))
}

func fault(t *testing.T, port int, kind string) {
	resp, err := http.Post(fmt.Sprintf("http://127.0.0.1:%d/sim/fault?kind=%s", port, kind), "", nil)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusAccepted, resp.StatusCode)
}

func sh(t *testing.T, name string, args ...string) string {
	out, err := exec.Command(name, args...).CombinedOutput()
	require.NoError(t, err, "%s %v: %s", name, args, out)
	return string(out)
}

func TestScopeIsolationUserAndJournal(t *testing.T) {
	e := newEnv(t)
	s, port := e.pool("iso", "0", "", "")
	snap := e.waitState(s, "ready", ready(1))
	assert.Equal(t, "pool-engine-iso.scope", snap.Unit)

	show := sh(t, "systemctl", "show", "-p", "Slice,DevicePolicy,DeviceAllow,ActiveState", snap.Unit)
	assert.Contains(t, show, "Slice=pool-managerd-engines.slice")
	assert.Contains(t, show, "DevicePolicy=closed")
	assert.Contains(t, show, "DeviceAllow=/dev/nvidia0 rw")
	assert.Contains(t, show, "DeviceAllow=/dev/nvidiactl rw")
	assert.NotContains(t, show, "/dev/nvidia1")
	assert.Contains(t, show, "ActiveState=active")

	var devs map[string]string
	get(t, port, "/sim/devices", &devs)
	assert.Equal(t, map[string]string{"/dev/nvidia0": "ENXIO", "/dev/nvidiactl": "ENXIO", "/dev/nvidia1": "EPERM"}, devs)

	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", snap.MainPID))
	require.NoError(t, err)
	uid := sh(t, "id", "-u", "pool-engine")
	assert.Contains(t, string(status), "Uid:\t"+strings.TrimSpace(uid)+"\t")
	assert.Contains(t, string(status), "NoNewPrivs:\t1")
	environ, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", snap.MainPID))
	require.NoError(t, err)
	assert.Contains(t, string(environ), "CUDA_VISIBLE_DEVICES=GPU-8f2c1a70-0000-4000-8000-000000000000\x00")
	assert.Contains(t, string(environ), "NVIDIA_VISIBLE_DEVICES=GPU-8f2c1a70-0000-4000-8000-000000000000\x00")

	// The engine's own lines, under its scope.
	require.Eventually(t, func() bool {
		out, _ := exec.Command("journalctl", "-u", snap.Unit, "--no-pager", "-o", "cat").CombinedOutput()
		return strings.Contains(string(out), "server is listening on http://127.0.0.1") &&
			strings.Contains(string(out), "GET /health")
	}, 20*time.Second, 100*time.Millisecond)
}

func TestFaultsAreClassifiedAndRestarted(t *testing.T) {
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
			e := newEnv(t)
			id := "f" + strings.NewReplacer(":", "", "-", "").Replace(c.kind)
			s, port := e.pool(id, "0", "", c.extra)
			first := e.waitState(s, "ready", ready(1))
			fault(t, port, c.kind)
			crashed := e.waitState(s, "the crash", func(s Snapshot) bool { return s.CrashCount == 1 })
			assert.False(t, crashed.Ready)
			assert.Equal(t, c.reason, crashed.LastReason)
			assert.Contains(t, crashed.LastError, c.errHas)
			if c.reason == crash.HealthCheck {
				assert.Len(t, crashed.HealthFailures, 3, "each failure has its timestamp")
			}
			again := e.waitState(s, "ready again", ready(2))
			assert.NotEqual(t, first.MainPID, again.MainPID)
			assert.Equal(t, uint64(1), again.RestartCount)
			want := 200 * time.Millisecond
			if c.reason == crash.CUDAError {
				want *= 2
			}
			got, err := metricSum(e.reg, "pool_managerd_backoff_delay_seconds")
			require.NoError(t, err)
			assert.InDelta(t, want.Seconds(), got, 1e-9, "backoff delay")
		})
	}
}

func TestExitZeroIsNotRestarted(t *testing.T) {
	e := newEnv(t)
	s, port := e.pool("clean", "0", "", "")
	e.waitState(s, "ready", ready(1))
	fault(t, port, "exit:0")
	snap := e.waitState(s, "stopped", func(s Snapshot) bool { return s.State == Stopped })
	assert.Zero(t, snap.CrashCount)
	assert.False(t, snap.Live)
	assert.Equal(t, 1, snap.Starts)
}

func TestStopEscalatesAndLeavesNothing(t *testing.T) {
	e := newEnv(t)
	s, port := e.pool("stubborn", "1", "", "")
	snap := e.waitState(s, "ready", ready(1))
	fault(t, port, "ignore-term")
	fault(t, port, "fork-child")
	pids := sh(t, "systemctl", "show", "-p", "ControlGroup", "--value", snap.Unit)
	require.NotEmpty(t, strings.TrimSpace(pids))
	start := time.Now()
	require.NoError(t, s.Stop(e.ctx))
	assert.GreaterOrEqual(t, time.Since(start), 2*time.Second, "SIGTERM was ignored: SIGKILL came after StopTimeoutSec")
	assert.Equal(t, Stopped, s.Snapshot().State)
	assert.Zero(t, s.Snapshot().CrashCount, "a requested stop is not a crash")
	out, _ := exec.Command("systemctl", "is-active", snap.Unit).CombinedOutput()
	assert.NotEqual(t, "active", strings.TrimSpace(string(out)))
	out, _ = exec.Command("pgrep", "-f", "pool-engine-sim").CombinedOutput()
	assert.Empty(t, strings.TrimSpace(string(out)), "no engine process or child survives")
}

func TestBreakerOpensAndPoolFails(t *testing.T) {
	e := newEnv(t)
	s, port := e.pool("loop", "0", "--fault exit:1 --fault-after 300ms", "BreakerThreshold=3\n")
	_ = port
	snap := e.waitState(s, "failed", func(s Snapshot) bool { return s.State == Failed })
	assert.Equal(t, uint64(3), snap.CrashCount)
	assert.Equal(t, "open", snap.BreakerState)
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
