// Package testpool runs pools of the engine simulator under a real
// supervisor and systemd, for tests that run inside a sandbox.
package testpool

import (
	"context"
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
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/engine"
	"github.com/llorch/pool-managerd/internal/gpu"
	"github.com/llorch/pool-managerd/internal/metrics"
	"github.com/llorch/pool-managerd/internal/model"
	"github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
	"github.com/llorch/pool-managerd/internal/users"
	"github.com/llorch/pool-managerd/internal/witness"
)

// Sim is the simulator's main package, for sandbox.Build.
const Sim = "github.com/llorch/pool-managerd/cmd/pool-engine-sim"

// Options is the sandbox every package using testpool needs: two fake
// GPUs and the engine user.
var Options = sandbox.Options{
	Nodes:   sandbox.FakeGPUs,
	Prepare: [][]string{{"useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "pool-engine"}},
}

const manager = `[Manager]
StateDir=%[1]s/state
RuntimeDir=%[1]s/run
CacheDir=%[1]s/cache
ModelsDir=%[1]s/models
[Inventory]
Backend=static
Device=0 GPU-8f2c1a70-0000-4000-8000-000000000000 /dev/nvidia0
Device=1 GPU-8f2c1a70-0000-4000-8000-000000000001 /dev/nvidia1
ControlDevice=/dev/nvidiactl
ControlDevice=/dev/nvidia-uvm
`

// T is what testpool needs of a test: testing.TB has it, and so can a
// behaviour scenario's adapter.
type T interface {
	require.TestingT
	sandbox.TB
	Cleanup(func())
}

// Env is one test's configuration directory, runtime and observers.
type Env struct {
	T       T
	Ctx     context.Context
	RT      *engine.Runtime
	Dir     string
	Reg     *prometheus.Registry
	Metrics *metrics.Set
	Log     *slog.Logger
	// Users are the engines' own users (made at the first pool).
	Users *users.Table
	inv   *gpu.Inventory
}

// New prepares an environment; handler receives the supervisors' logs
// (nil: stderr with go test -v, else nowhere). Outside a sandbox the test
// skips (sandbox.Need).
func New(t T, handler slog.Handler) *Env {
	t.Helper()
	sandbox.Need(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	exe, err := os.Executable()
	require.NoError(t, err)
	rt, err := engine.New(ctx, []string{exe})
	require.NoError(t, err)
	t.Cleanup(rt.Close)
	// systemd as the second witness of every exit, as in the daemon.
	rt.Witness, err = witness.New(ctx)
	require.NoError(t, err)
	t.Cleanup(func() { rt.Witness.Close() })
	dir, err := os.MkdirTemp("", "pool-test-")
	require.NoError(t, err)
	require.NoError(t, os.Chmod(dir, 0o755))
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "pools.d"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pool-managerd.conf"), []byte(fmt.Sprintf(manager, dir)), 0o644))
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "models"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "model.gguf"), []byte("GGUF\x03\x00\x00\x00 a tiny model"), 0o644))
	if handler == nil {
		handler = slog.DiscardHandler
		if testing.Verbose() {
			handler = slog.NewTextHandler(os.Stderr, nil)
		}
	}
	reg := prometheus.NewRegistry()
	return &Env{T: t, Ctx: ctx, RT: rt, Dir: dir, Reg: reg, Metrics: metrics.New(reg), Log: slog.New(handler)}
}

// Pool is one supervised pool of the simulator.
type Pool struct {
	*supervisor.Supervisor
	ID   string
	Port int
	env  *Env
}

// Spec describes a pool of the simulator.
type Spec struct {
	ID, Devices string
	// Model is the model ref (default: the environment's model.gguf).
	Model string
	// SimArgs are extra simulator flags.
	SimArgs string
	// Engine are the [Engine] lines besides ExecStart= and Port=
	// (default: Version=sim-1, StopTimeoutSec=2).
	Engine string
	// Extra is appended after the [Restart] section (start it with a
	// section header to go elsewhere).
	Extra string
	// NoStart leaves the pool stopped.
	NoStart bool
	// Holders, when set, stands in for the processes on the pool's GPUs;
	// GPURetry, when set, is how often a start they hold looks again.
	Holders  func() ([]supervisor.GPUHolder, error)
	GPURetry time.Duration
	// Asleep, when set, names the sleeping pools of its group.
	Asleep func() []string
	// Memory, when set, stands in for the memory of the pool's GPUs;
	// MemoryRetry, when set, is how often a start it refused looks again.
	Memory      func() ([]gpu.DeviceMemory, error)
	MemoryRetry time.Duration
	// Port is the engine's port (0: a free one).
	Port int
	// Wrap is a command the simulator's command line is given to, as a
	// container engine is given its engine's ("": the simulator itself).
	Wrap string
}

// Pool starts a pool of the simulator on the given devices with extra
// simulator flags and extra pool file lines (see Spec.Extra).
func (e *Env) Pool(id, devices, simArgs, extra string) *Pool {
	return e.Start(Spec{ID: id, Devices: devices, SimArgs: simArgs, Extra: extra})
}

// WriteModel writes a model file under the models directory and returns
// its path.
func (e *Env) WriteModel(name, content string) string {
	p := filepath.Join(e.Dir, "models", name)
	require.NoError(e.T, os.WriteFile(p, []byte(content), 0o644))
	return p
}

// Start writes the pool file and starts the pool. Its engine is stopped
// when the test ends.
func (e *Env) Start(ps Spec) *Pool {
	t := e.T
	t.Helper()
	port := ps.Port
	if port == 0 {
		port = freePort(t)
	}
	sim := os.Getenv(sandbox.BinEnv("pool-engine-sim"))
	require.NotEmpty(t, sim, "the simulator was not built for this sandbox")
	if ps.Model == "" {
		ps.Model = filepath.Join(e.Dir, "model.gguf")
	}
	if ps.Engine == "" {
		ps.Engine = "Version=sim-1\nStopTimeoutSec=2\n"
	}
	id := ps.ID
	wrap := ""
	if ps.Wrap != "" {
		wrap = ps.Wrap + " "
	}
	text := fmt.Sprintf(`[Pool]
Devices=%s
Model=%s
[Engine]
ExecStart=%s%s --model %%m --port %%p %s --probe-devices /dev/nvidia0,/dev/nvidia1,/dev/nvidiactl
Port=%d
%s
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
%s`, ps.Devices, ps.Model, wrap, sim, ps.SimArgs, port, ps.Engine, ps.Extra)
	require.NoError(t, os.WriteFile(filepath.Join(e.Dir, "pools.d", id+".pool"), []byte(text), 0o644))
	c, err := config.Load(e.Dir)
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
	if e.Users == nil {
		e.Users = users.Open(filepath.Join(c.Manager.StateDir, users.File), c.Manager.CacheDir, c.Manager.EngineUIDs.First, c.Manager.EngineUIDs.Last, config.EngineGroup)
	}
	cfg, err := supervisor.FromPool(p, &c.Manager, e.inv, model.New(c.Manager.ModelsDir, filepath.Join(c.Manager.StateDir, "staged")), e.Users)
	require.NoError(t, err)
	if ps.Holders != nil {
		cfg.Holders = ps.Holders
	}
	cfg.GPURetry = ps.GPURetry
	cfg.Asleep = ps.Asleep
	if ps.Memory != nil {
		cfg.Memory = ps.Memory
	}
	cfg.MemoryRetry = ps.MemoryRetry
	s := supervisor.New(cfg, e.RT, e.Log, e.Metrics)
	ctx, cancel := context.WithCancel(e.Ctx)
	go s.Run(ctx)
	t.Cleanup(func() {
		sctx, scancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer scancel()
		if err := s.Stop(sctx); err != nil {
			t.Errorf("stopping pool %s: %v", id, err)
		}
		cancel()
	})
	if !ps.NoStart {
		require.NoError(t, s.Start())
	}
	return &Pool{Supervisor: s, ID: id, Port: port, env: e}
}

// Wait waits (a minute at most) until cond holds.
func (p *Pool) Wait(what string, cond func(supervisor.Snapshot) bool) (supervisor.Snapshot, error) {
	ctx, cancel := context.WithTimeout(p.env.Ctx, 60*time.Second)
	defer cancel()
	s, err := p.Supervisor.Wait(ctx, cond)
	if err != nil {
		return s, fmt.Errorf("waiting for %s: %w", what, err)
	}
	return s, nil
}

// ReadyAfter holds once the pool is ready on its n-th engine start.
func ReadyAfter(n int) func(supervisor.Snapshot) bool {
	return func(s supervisor.Snapshot) bool { return s.Ready && s.Starts >= n }
}

// Fault asks the simulator for a fault.
func (p *Pool) Fault(kind string) error {
	resp, err := http.Post(fmt.Sprintf("http://127.0.0.1:%d/sim/fault?kind=%s", p.Port, kind), "", nil)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		return fmt.Errorf("fault %s: %s", kind, resp.Status)
	}
	return nil
}

func freePort(t T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// SimPoolFile is the text of a .pool file whose engine is the simulator at
// sim, on devices, model and port, stopped within 2 s; more follows it:
// further [Engine] keys first, then other sections.
func SimPoolFile(sim, devices, model string, port int, more string) []byte {
	return []byte(fmt.Sprintf("[Pool]\nDevices=%s\nModel=%s\n[Engine]\nExecStart=%s --model %%m --port %%p\nPort=%d\nStopTimeoutSec=2\n%s",
		devices, model, sim, port, more))
}

// InstallDaemon installs the project's pool-managerd.service (running the
// given binary on configDir) and bus policy into the running sandbox, and
// starts the daemon: it returns once the daemon said READY=1. Paths are
// relative to the repository root.
func InstallDaemon(root, binary, configDir string) error {
	unit, err := os.ReadFile(filepath.Join(root, "systemd", "pool-managerd.service"))
	if err != nil {
		return err
	}
	unit = []byte(strings.Replace(string(unit), "ExecStart=/usr/bin/pool-managerd", "ExecStart="+binary+" --config-dir "+configDir, 1))
	if err := os.WriteFile("/etc/systemd/system/pool-managerd.service", unit, 0o644); err != nil {
		return err
	}
	// The engines' slice, as the packages install it: its weights decide
	// who gets the CPU when engines take it all.
	slice, err := os.ReadFile(filepath.Join(root, "systemd", "pool-managerd-engines.slice"))
	if err != nil {
		return err
	}
	if err := os.WriteFile("/etc/systemd/system/pool-managerd-engines.slice", slice, 0o644); err != nil {
		return err
	}
	policy, err := os.ReadFile(filepath.Join(root, "dbus", "org.llorch.PoolManager1.conf"))
	if err != nil {
		return err
	}
	if err := os.WriteFile("/etc/dbus-1/system.d/org.llorch.PoolManager1.conf", policy, 0o644); err != nil {
		return err
	}
	for _, c := range [][]string{{"systemctl", "reload", "dbus.service"}, {"systemctl", "daemon-reload"}, {"systemctl", "start", "pool-managerd.service"}} {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			j, _ := exec.Command("journalctl", "-u", "pool-managerd", "--no-pager", "-o", "cat", "-n", "20").CombinedOutput()
			return fmt.Errorf("%s: %v: %s\n%s", strings.Join(c, " "), err, out, j)
		}
	}
	return nil
}
