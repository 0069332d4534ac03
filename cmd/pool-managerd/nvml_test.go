//go:build linux && cgo

package main

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh100"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/engine"
	"github.com/llorch/pool-managerd/internal/gpu"
	"github.com/llorch/pool-managerd/internal/gpu/nvmlmock"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// syncBuffer is the daemon's stderr: its goroutines log concurrently.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// runDaemon runs the daemon's run mode in this process until the test
// ends (a SIGTERM of our own), then stops the scopes it leaves. exit gets
// its exit code if it ends early.
func runDaemon(t *testing.T, dir string, cfg *config.Config, scopes ...string) (*syncBuffer, chan int) {
	// While this is registered, a SIGTERM that arrives after the daemon
	// returned cannot kill the test binary.
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	logs := &syncBuffer{}
	exit := make(chan int, 1)
	go func() { exit <- daemon(dir, cfg, logs) }()
	t.Cleanup(func() {
		defer signal.Stop(term)
		defer exec.Command("systemctl", append([]string{"stop"}, scopes...)...).Run()
		syscall.Kill(os.Getpid(), syscall.SIGTERM)
		select {
		case code := <-exit:
			assert.Equal(t, exitOK, code)
		case <-time.After(30 * time.Second):
			t.Error("the daemon does not stop on SIGTERM")
		}
		if t.Failed() {
			t.Logf("daemon log:\n%s", logs.String())
		}
	})
	return logs, exit
}

// The daemon's run mode on an NVML host (an 8-GPU DGX H100 from go-nvml's
// mocks, GPU 0 at minor 1 and GPU 1 at minor 0): the inventory and the
// scopes' DeviceAllow come from NVML, an XID on one pool's GPU crashes
// that pool's engine and no other, and NVML failing while watching is
// logged, not a crash.
func TestDaemonOnAnNVMLHostRoutesXIDsToTheOwningPool(t *testing.T) {
	sandbox.Need(t)
	host := nvmlmock.New(dgxh100.New(), 1, 0, 9, 10, 11, 12, 13, 14)
	newNVML = func() gpu.NVML { return gpu.NewNVMLWith(host.Server) }
	t.Cleanup(func() { newNVML = gpu.NewNVML })
	installShim(t)

	dir, _ := daemonDir(t, "xida", "", "[Health]\nIntervalSec=0.5\nTimeoutSec=0.5\n")
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pool-managerd.conf"), []byte(`[Manager]
StateDir=`+dir+`/state
RuntimeDir=`+dir+`/run
CacheDir=`+dir+`/cache
ModelsDir=`+dir+`/models
MetricsTextfile=
[Inventory]
Backend=nvml
GPUResetCommand=`+dir+`/reset-gpu --gpu %g
`), 0o644))
	// The reset command records its argument and whether the held pool's
	// scope was still there when it ran.
	require.NoError(t, os.WriteFile(filepath.Join(dir, "reset-gpu"), []byte("#!/bin/sh\necho \"$2 $(systemctl is-active pool-engine-xidb.scope)\" >> "+dir+"/resets\n"), 0o755))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	// xidb is a two-GPU pool: GPU 1 (minor 0) and GPU 2 (minor 9, a node
	// made here in the sandbox's copy-on-write /dev).
	require.NoError(t, unix.Mknod("/dev/nvidia9", unix.S_IFCHR|0o666, int(unix.Mkdev(195, 9))))
	t.Cleanup(func() { os.Remove("/dev/nvidia9") })
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", "xidb.pool"), testpool.SimPoolFile(os.Getenv(sandbox.BinEnv("pool-engine-sim")),
		host.GPU(1).UUID+" "+host.GPU(2).UUID, dir+"/model.gguf", port, "[Health]\nIntervalSec=0.5\nTimeoutSec=0.5\n"), 0o644))
	cfg, err := config.Load(dir)
	require.NoError(t, err)

	// GPUs held for a reset are asked about every 100 ms here; set before
	// the daemon runs, restored after it stopped.
	gpuFirstCheck, gpuCheckEvery = 100*time.Millisecond, 100*time.Millisecond
	t.Cleanup(func() { gpuFirstCheck, gpuCheckEvery = 5*time.Second, 30*time.Second })
	logs, exit := runDaemon(t, dir, cfg, "pool-engine-xida.scope", "pool-engine-xidb.scope")

	prop := func(pool, name string) string {
		out, _ := exec.Command("busctl", "get-property", "org.llorch.PoolManager1", "/org/llorch/PoolManager1/pool/"+pool,
			"org.llorch.PoolManager1.Pool", name).CombinedOutput()
		return strings.TrimSpace(string(out))
	}
	for _, p := range []string{"xida", "xidb"} {
		require.Eventually(t, func() bool {
			select {
			case code := <-exit:
				exit <- code
				return true
			default:
			}
			return prop(p, "Ready") == "b true"
		}, 30*time.Second, 100*time.Millisecond, "pool %s ready", p)
		require.Equal(t, "b true", prop(p, "Ready"), "pool %s: the daemon ended early:\n%s", p, logs.String())
	}
	assert.NotContains(t, logs.String(), "static inventory", "NVML, not the static fallback")

	allow := func(pool string) []string {
		return strings.Split(sh(t, "systemctl", "show", "-p", "DeviceAllow", "--value", "pool-engine-"+pool+".scope"), "\n")
	}
	assert.ElementsMatch(t, []string{"/dev/nvidia1 rw", "/dev/nvidiactl rw"}, allow("xida"), "GPU 0 is minor 1")
	assert.ElementsMatch(t, []string{"/dev/nvidia0 rw", "/dev/nvidia9 rw", "/dev/nvidiactl rw"}, allow("xidb"), "GPU 1 is minor 0, GPU 2 minor 9")
	var pid int
	_, err = fmt.Sscanf(prop("xida", "MainPID"), "u %d", &pid)
	require.NoError(t, err)
	environ, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	require.NoError(t, err)
	assert.Contains(t, strings.Split(string(environ), "\x00"), "CUDA_VISIBLE_DEVICES="+host.GPU(0).UUID, "the engine sees GPU 0 by NVML's UUID")

	require.Eventually(t, func() bool { return len(host.Stats().Registered) == 3 }, 10*time.Second, 20*time.Millisecond,
		"the daemon watches its pools' GPUs")
	assert.ElementsMatch(t, []string{host.GPU(0).UUID, host.GPU(1).UUID, host.GPU(2).UUID}, host.Stats().Registered)
	// A device-level XID a restart clears (94, a contained ECC error)
	// restarts the pool on that GPU, and only it.
	require.NoError(t, host.XID(0, 94, ^uint32(0), ^uint32(0)))
	require.Eventually(t, func() bool { return prop("xida", "CrashCount") == "u 1" }, 10*time.Second, 50*time.Millisecond,
		"the XID crashes pool xida's engine")
	assert.Contains(t, prop("xida", "LastError"), "Xid 94")
	assert.Equal(t, "u 0", prop("xidb", "CrashCount"), "the other GPU's pool is untouched")
	assert.Equal(t, "b true", prop("xidb", "Ready"))
	assert.NotContains(t, logs.String(), "GPU XID event on a GPU no pool uses")
	require.Eventually(t, func() bool { return prop("xida", "Ready") == "b true" }, 20*time.Second, 50*time.Millisecond, "xida restarted")

	// An XID NVIDIA's catalog says to ignore (43: the application
	// stopped) is journaled, nothing more.
	require.NoError(t, host.XID(0, 43, ^uint32(0), ^uint32(0)))
	require.Eventually(t, func() bool { return strings.Contains(logs.String(), "GPU XID 43 on "+host.GPU(0).UUID) }, 10*time.Second, 50*time.Millisecond)
	assert.Equal(t, "u 1", prop("xida", "CrashCount"), "an ignored XID restarts nothing")

	// A GPU that fell off the bus (79), one of a two-GPU pool's, holds
	// that pool failed, with no restart loop, until NVML says the GPU is
	// usable again; the pool on another GPU runs on.
	host.SetHealth(2, nvmlmock.Health{Lost: true})
	require.NoError(t, host.XID(2, 79, ^uint32(0), ^uint32(0)))
	require.Eventually(t, func() bool { return prop("xidb", "State") == `s "failed"` }, 10*time.Second, 50*time.Millisecond,
		"the pool on the lost GPU is held")
	assert.Contains(t, prop("xidb", "LastError"), "GPU "+host.GPU(2).UUID+" is lost: Xid 79")
	assert.Equal(t, "u 1", prop("xidb", "CrashCount"), "its engine went once")
	assert.Equal(t, "b true", prop("xida", "Ready"), "the other GPU's pool is untouched")
	assert.Contains(t, logs.String(), "its pools are held, not restarted")
	assert.Never(t, func() bool { return prop("xidb", "State") != `s "failed"` || prop("xidb", "RestartCount") != "u 0" },
		time.Second, 50*time.Millisecond, "no restart loop against a lost GPU")
	host.SetHealth(2, nvmlmock.Health{})
	require.Eventually(t, func() bool { return prop("xidb", "Ready") == "b true" }, 20*time.Second, 50*time.Millisecond,
		"the pool comes back once NVML says the GPU is usable")
	assert.Contains(t, logs.String(), "is usable again")
	assert.NoFileExists(t, filepath.Join(dir, "resets"), "a lost GPU is not reset by the command")

	// An XID that needs a reset (48, double-bit ECC) with GPUResetCommand=
	// set: the command runs once the pool on the GPU has stopped.
	host.SetHealth(2, nvmlmock.Health{RemapPending: true})
	require.NoError(t, host.XID(2, 48, ^uint32(0), ^uint32(0)))
	require.Eventually(t, func() bool {
		b, _ := os.ReadFile(filepath.Join(dir, "resets"))
		return len(b) > 0
	}, 10*time.Second, 50*time.Millisecond, "the reset command runs")
	b, err := os.ReadFile(filepath.Join(dir, "resets"))
	require.NoError(t, err)
	assert.Equal(t, host.GPU(2).UUID+" inactive\n", string(b), "run with the GPU's UUID, after the pool's engine is gone")
	require.Eventually(t, func() bool {
		return strings.Contains(logs.String(), "GPUResetCommand ran: "+dir+"/reset-gpu --gpu "+host.GPU(2).UUID)
	},
		10*time.Second, 50*time.Millisecond, "its outcome is journaled")
	assert.Equal(t, `s "failed"`, prop("xidb", "State"), "held while NVML says a reset is pending")
	host.SetHealth(2, nvmlmock.Health{})
	require.Eventually(t, func() bool { return prop("xidb", "Ready") == "b true" }, 20*time.Second, 50*time.Millisecond,
		"back once the GPU is usable")

	host.FailWait(nvml.ERROR_GPU_IS_LOST)
	require.Eventually(t, func() bool {
		return strings.Contains(logs.String(), `not watching for GPU XID events (trying again every 30 s)" ERROR="XID events: NVML: wait for events: ERROR_GPU_IS_LOST"`)
	}, 10*time.Second, 50*time.Millisecond, "NVML failing while watching is logged")
	assert.Equal(t, "b true", prop("xidb", "Ready"), "and the daemon runs on")
}

// installShim puts the sandbox's pool-managerd-shim where the packages
// install it: the daemon runs in this test binary, and without the shim it
// would start engines by re-executing the binary. The sandbox's root is a
// copy-on-write view, so the host's file system is never touched.
func installShim(t *testing.T) {
	t.Helper()
	src, err := os.Open(os.Getenv(sandbox.BinEnv("pool-managerd-shim")))
	require.NoError(t, err)
	defer src.Close()
	backup := engine.ShimPath + ".test-backup"
	had := os.Rename(engine.ShimPath, backup) == nil
	require.NoError(t, os.MkdirAll(filepath.Dir(engine.ShimPath), 0o755))
	dst, err := os.OpenFile(engine.ShimPath, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o755)
	require.NoError(t, err)
	t.Cleanup(func() {
		os.Remove(engine.ShimPath)
		if had {
			os.Rename(backup, engine.ShimPath)
		}
	})
	_, err = io.Copy(dst, src)
	require.NoError(t, err)
	require.NoError(t, dst.Close())
}

// Backend=auto on a host whose NVML does not load: the daemon says so and
// runs its pools on the static inventory, and watches no XID.
func TestDaemonWithoutNVMLRunsOnTheStaticInventory(t *testing.T) {
	sandbox.Need(t)
	host := nvmlmock.New(dgxh100.New())
	host.FailInit(nvml.ERROR_LIBRARY_NOT_FOUND)
	newNVML = func() gpu.NVML { return gpu.NewNVMLWith(host.Server) }
	t.Cleanup(func() { newNVML = gpu.NewNVML })
	installShim(t)
	dir, _ := daemonDir(t, "auto", "", "[Health]\nIntervalSec=0.5\nTimeoutSec=0.5\n")
	conf := filepath.Join(dir, "pool-managerd.conf")
	b, err := os.ReadFile(conf)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(conf, []byte(strings.Replace(string(b), "Backend=static", "Backend=auto", 1)), 0o644))
	cfg, err := config.Load(dir)
	require.NoError(t, err)
	require.Equal(t, config.BackendAuto, cfg.Manager.Inventory.Backend)

	logs, _ := runDaemon(t, dir, cfg, "pool-engine-auto.scope")

	require.Eventually(t, func() bool {
		out, _ := exec.Command("busctl", "get-property", "org.llorch.PoolManager1", "/org/llorch/PoolManager1/pool/auto",
			"org.llorch.PoolManager1.Pool", "Ready").CombinedOutput()
		return strings.TrimSpace(string(out)) == "b true"
	}, 30*time.Second, 100*time.Millisecond, "pool ready")
	assert.Contains(t, logs.String(), `msg="NVML unavailable, using the static inventory" ERROR="[Inventory] Backend=auto could not use NVML: NVML: libnvidia-ml.so.1 not found`)
	assert.Equal(t, []string{"/dev/nvidia0 rw", "/dev/nvidiactl rw"},
		sortedLines(sh(t, "systemctl", "show", "-p", "DeviceAllow", "--value", "pool-engine-auto.scope")), "the static Device= line's node")
	time.Sleep(200 * time.Millisecond)
	assert.Len(t, host.Server.InitCalls(), 1, "NVML tried once, for the inventory")
	assert.Empty(t, host.Server.EventSetCreateCalls(), "no XID watch without NVML")
	assert.NotContains(t, logs.String(), xidWarningText)
}

const xidWarningText = "not watching for GPU XID events"

func sortedLines(s string) []string {
	l := strings.Split(s, "\n")
	slices.Sort(l)
	return l
}
