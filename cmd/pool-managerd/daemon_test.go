package main

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh100"

	"github.com/llorch/pool-managerd/internal/gpu"
	"github.com/llorch/pool-managerd/internal/gpu/nvmlmock"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// The tests of this package run inside a sandbox: the daemon runs there as
// a unit of a real systemd.
func TestMain(m *testing.M) {
	// The test binary is the installed unit's daemon on an NVML host
	// made of go-nvml's mocks (see TestTheInstalledUnitReadsTheKernelsXIDLines).
	if os.Getenv(unitOnMockNVML) == "1" {
		host := nvmlmock.New(dgxh100.New())
		newNVML = func() gpu.NVML { return gpu.NewNVMLWith(host.Server) }
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(sandbox.Main(m, testpool.Options, sandbox.Build("github.com/llorch/pool-managerd/cmd/pool-managerd", "github.com/llorch/pool-managerd/cmd/pool-managerd-shim", testpool.Sim)))
}

func sh(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	require.NoError(t, err, "%s %v: %s", name, args, out)
	return strings.TrimSpace(string(out))
}

// daemonDir writes a configuration directory with one simulator pool on
// GPU 0 (its model: model, or a tiny one) and installs the bus policy; it
// returns the directory and the engine's port.
func daemonDir(t *testing.T, pool, model, more string) (string, int) {
	t.Helper()
	sandbox.Need(t)
	dir, err := os.MkdirTemp("", "daemon-test-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "pools.d"), 0o755))
	if model == "" {
		model = dir + "/model.gguf"
		require.NoError(t, os.WriteFile(model, []byte("GGUF\x03\x00\x00\x00"), 0o644))
	}
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pool-managerd.conf"), []byte(`[Manager]
StateDir=`+dir+`/state
RuntimeDir=`+dir+`/run
CacheDir=`+dir+`/cache
ModelsDir=`+dir+`/models
[Inventory]
Backend=static
Device=0 GPU-8f2c1a70-0000-4000-8000-000000000000 /dev/nvidia0
ControlDevice=/dev/nvidiactl
`), 0o644))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", pool+".pool"), testpool.SimPoolFile(os.Getenv(sandbox.BinEnv("pool-engine-sim")),
		"0", model, port, more), 0o644))

	policy, err := os.ReadFile("../../dbus/org.llorch.PoolManager1.conf")
	require.NoError(t, err)
	require.NoError(t, os.WriteFile("/etc/dbus-1/system.d/org.llorch.PoolManager1.conf", policy, 0o644))
	sh(t, "systemctl", "reload", "dbus.service")
	return dir, port
}

// The daemon started by systemd supervises its pools; stopping the daemon
// leaves the engines running in their own scopes.
func TestDaemonRunsPoolsAndLeavesEnginesOnStop(t *testing.T) {
	dir, port := daemonDir(t, "demo", "", "[Health]\nIntervalSec=0.5\nTimeoutSec=0.5\n")
	daemon := os.Getenv(sandbox.BinEnv("pool-managerd"))
	sh(t, "systemd-run", "--unit=pool-managerd-test.service", "--property=KillMode=control-group", daemon, "--config-dir", dir)
	defer exec.Command("systemctl", "stop", "pool-engine-demo.scope").Run()
	defer exec.Command("systemctl", "stop", "pool-managerd-test.service").Run()

	health := fmt.Sprintf("http://127.0.0.1:%d/health", port)
	require.Eventually(t, func() bool {
		resp, err := http.Get(health)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}, 30*time.Second, 100*time.Millisecond, "the engine answers")
	assert.Equal(t, "active", sh(t, "systemctl", "is-active", "pool-engine-demo.scope"))
	assert.Equal(t, "pool-managerd-engines.slice", sh(t, "systemctl", "show", "-p", "Slice", "--value", "pool-engine-demo.scope"))
	// The engine's parent in the scope is the dedicated shim found beside
	// the daemon, not a re-executed daemon.
	shim := filepath.Join(filepath.Dir(daemon), "pool-managerd-shim")
	var exes []string
	cg := sh(t, "systemctl", "show", "-p", "ControlGroup", "--value", "pool-engine-demo.scope")
	procs, err := os.ReadFile("/sys/fs/cgroup/systemd" + cg + "/cgroup.procs") // hybrid layout
	if err != nil {
		procs, err = os.ReadFile("/sys/fs/cgroup" + cg + "/cgroup.procs")
	}
	require.NoError(t, err)
	for _, pid := range strings.Fields(string(procs)) {
		exe, _ := os.Readlink("/proc/" + pid + "/exe")
		exes = append(exes, exe)
	}
	assert.Contains(t, exes, shim, "processes of the scope: %v", exes)
	require.Eventually(t, func() bool {
		out, _ := exec.Command("journalctl", "-u", "pool-managerd-test.service", "--no-pager", "-o", "cat").CombinedOutput()
		return strings.Contains(string(out), "engine ready")
	}, 20*time.Second, 100*time.Millisecond)
	out := sh(t, "journalctl", "-u", "pool-managerd-test.service", "--no-pager", "-o", "verbose")
	assert.Contains(t, out, "POOL_ID=demo", "structured fields reach the journal")

	sh(t, "systemctl", "stop", "pool-managerd-test.service")
	assert.Equal(t, "active", sh(t, "systemctl", "is-active", "pool-engine-demo.scope"), "the engine outlives the daemon")
	resp, err := http.Get(health)
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode)
}

// The first start of a big model hashes it for longer than systemd waits
// for readiness: READY=1 must not wait for it, nor the bus.
func TestBigModelDoesNotHoldUpReadiness(t *testing.T) {
	dir, err := os.MkdirTemp("", "big-model-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	big := filepath.Join(dir, "big.gguf")
	f, err := os.Create(big)
	require.NoError(t, err)
	_, err = f.WriteString("GGUF\x03\x00\x00\x00")
	require.NoError(t, err)
	require.NoError(t, f.Truncate(16<<30)) // sparse: hashed, never stored
	require.NoError(t, f.Close())
	require.NoError(t, os.Chmod(big, 0o644))
	cfg, _ := daemonDir(t, "big", big, "")

	daemon := os.Getenv(sandbox.BinEnv("pool-managerd"))
	defer exec.Command("systemctl", "stop", "pool-engine-big.scope").Run()
	defer exec.Command("systemctl", "stop", "pool-managerd-big.service").Run()
	start := time.Now()
	// systemd-run waits for the start job: for READY=1.
	out, err := exec.Command("systemd-run", "--unit=pool-managerd-big.service", "--service-type=notify",
		"--property=TimeoutStartSec=4s", "--property=NotifyAccess=main", daemon, "--config-dir", cfg).CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Less(t, time.Since(start), 4*time.Second)
	assert.Equal(t, "active", sh(t, "systemctl", "is-active", "pool-managerd-big.service"))
	state := sh(t, "busctl", "get-property", "org.llorch.PoolManager1", "/org/llorch/PoolManager1/pool/big",
		"org.llorch.PoolManager1.Pool", "State")
	assert.Equal(t, `s "starting"`, state, "still hashing, and the bus answers")
}

// A reload leaves the old model staged (a rollback may want it); the next
// prune, here after a configuration reload, removes what no pool runs on.
func TestStagedModelsNoPoolUsesArePruned(t *testing.T) {
	cfg, port := daemonDir(t, "prune", "", "[Health]\nIntervalSec=0.5\nTimeoutSec=0.5\n")
	require.NoError(t, os.MkdirAll(filepath.Join(cfg, "models"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(cfg, "models", "two.gguf"), []byte("GGUF\x03\x00\x00\x00 two"), 0o644))
	daemon := os.Getenv(sandbox.BinEnv("pool-managerd"))
	defer exec.Command("systemctl", "stop", "pool-engine-prune.scope").Run()
	defer exec.Command("systemctl", "stop", "pool-managerd-prune.service").Run()
	sh(t, "systemd-run", "--unit=pool-managerd-prune.service", "--service-type=notify", "--property=NotifyAccess=main",
		"--property=ExecReload=/bin/kill -HUP $MAINPID", daemon, "--config-dir", cfg)
	health := fmt.Sprintf("http://127.0.0.1:%d/health", port)
	ready := func() bool {
		resp, err := http.Get(health)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}
	poolReady := func() bool {
		out, _ := exec.Command("busctl", "get-property", "org.llorch.PoolManager1", "/org/llorch/PoolManager1/pool/prune",
			"org.llorch.PoolManager1.Pool", "Ready").CombinedOutput()
		return strings.TrimSpace(string(out)) == "b true"
	}
	require.Eventually(t, poolReady, 30*time.Second, 100*time.Millisecond)
	staged := func() []string {
		m, _ := filepath.Glob(filepath.Join(cfg, "state", "staged", "sha256-*", "*.gguf"))
		for i := range m {
			m[i] = filepath.Base(m[i])
		}
		return m
	}
	require.Equal(t, []string{"model.gguf"}, staged())

	sh(t, "busctl", "--timeout=60", "call", "org.llorch.PoolManager1", "/org/llorch/PoolManager1",
		"org.llorch.PoolManager1.Manager", "Reload", "sst", "prune", "two.gguf", "10000")
	assert.ElementsMatch(t, []string{"model.gguf", "two.gguf"}, staged(), "the old model stays staged for a rollback")

	sh(t, "systemctl", "reload", "pool-managerd-prune.service")
	require.Eventually(t, func() bool { return len(staged()) == 1 }, 10*time.Second, 50*time.Millisecond)
	assert.Equal(t, []string{"two.gguf"}, staged(), "what no pool uses is pruned")
	assert.FileExists(t, filepath.Join(cfg, "model.gguf"), "the operator's model is never touched")
	assert.True(t, ready(), "the pool serves on")
}
