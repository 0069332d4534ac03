//go:build linux && cgo

package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// unitOnMockNVML makes the test binary run as the daemon on mocked NVML.
const unitOnMockNVML = "POOL_MANAGERD_TEST_UNIT_ON_MOCK_NVML"

// The daemon as the installed unit runs it (ProtectKernelLogs=yes, no
// CAP_SYSLOG: /dev/kmsg cannot be opened there) reads the kernel's XID
// lines from the journal: a line any process logs names a pool's engine
// and acts on nothing, the kernel's own line of another process is
// journaled as no pool's, and the kernel's line of the pool's engine
// restarts that pool. The daemon is this test binary on go-nvml's mocked
// DGX H100 (GPU 0 at PCI 0000:00:00.0), under the unit file as shipped.
func TestTheInstalledUnitReadsTheKernelsXIDLines(t *testing.T) {
	sandbox.Need(t)
	installShim(t)
	exe, err := os.Executable()
	require.NoError(t, err)
	dir, _ := daemonDir(t, "kx", "", "[Health]\nIntervalSec=0.5\nTimeoutSec=0.5\n")
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pool-managerd.conf"), []byte(`[Manager]
StateDir=`+dir+`/state
RuntimeDir=`+dir+`/run
CacheDir=`+dir+`/cache
ModelsDir=`+dir+`/models
MetricsTextfile=
[Inventory]
Backend=nvml
`), 0o644))
	b, err := os.ReadFile(filepath.Join(dir, "pools.d", "kx.pool"))
	require.NoError(t, err)
	require.Contains(t, string(b), "Devices=0\n", "GPU 0: the mock's UUIDs differ in each process")

	dropIn := "/etc/systemd/system/pool-managerd.service.d"
	require.NoError(t, os.MkdirAll(dropIn, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dropIn, "mock-nvml.conf"), []byte("[Service]\nEnvironment="+unitOnMockNVML+"=1\n"), 0o644))
	t.Cleanup(func() {
		exec.Command("systemctl", "stop", "pool-managerd.service", "pool-engine-kx.scope").Run()
		os.RemoveAll(dropIn)
		os.Remove("/etc/systemd/system/pool-managerd.service")
		exec.Command("systemctl", "daemon-reload").Run()
	})
	require.NoError(t, testpool.InstallDaemon("../..", exe, dir))
	assert.Equal(t, "yes", sh(t, "systemctl", "show", "-p", "ProtectKernelLogs", "--value", "pool-managerd.service"))
	assert.NotContains(t, sh(t, "systemctl", "show", "-p", "CapabilityBoundingSet", "--value", "pool-managerd.service"), "cap_syslog")

	prop := func(name string) string {
		out, _ := exec.Command("busctl", "get-property", "org.llorch.PoolManager1", "/org/llorch/PoolManager1/pool/kx",
			"org.llorch.PoolManager1.Pool", name).CombinedOutput()
		return strings.TrimSpace(string(out))
	}
	daemonLog := func() string {
		out, _ := exec.Command("journalctl", "--no-pager", "--output=cat", "-u", "pool-managerd.service").CombinedOutput()
		return string(out)
	}
	require.Eventually(t, func() bool { return prop("Ready") == "b true" }, 30*time.Second, 100*time.Millisecond, "pool ready:\n%s", daemonLog())
	var engine int
	_, err = fmt.Sscanf(prop("MainPID"), "u %d", &engine)
	require.NoError(t, err)

	line := func(pid int, name string) string {
		return fmt.Sprintf("NVRM: Xid (PCI:0000:00:00): 31, pid=%d, name=%s, ", pid, name)
	}
	out, err := exec.Command("logger", line(engine, "forged")+"Ch 00000008").CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.Eventually(t, func() bool {
		out, _ := exec.Command("journalctl", "--boot", "--no-pager", "--output=cat", "--lines=500").Output()
		return strings.Contains(string(out), "name=forged,")
	}, 10*time.Second, 50*time.Millisecond, "the forged line is in the journal")
	foreign := exec.Command("sleep", "300")
	require.NoError(t, foreign.Start())
	t.Cleanup(func() { foreign.Process.Kill(); foreign.Wait() })
	sandbox.KernelPrints(t, line(foreign.Process.Pid, "other"))
	require.Eventually(t, func() bool {
		return strings.Contains(daemonLog(), "GPU XID of a process in no pool's scope: no pool acts")
	}, 10*time.Second, 50*time.Millisecond, "the kernel's line of another process is read:\n%s", daemonLog())
	assert.Equal(t, "u 0", prop("CrashCount"), "the forged line before it acted on nothing")

	sandbox.KernelPrints(t, line(engine, "engine"))
	require.Eventually(t, func() bool { return prop("CrashCount") == "u 1" }, 10*time.Second, 50*time.Millisecond,
		"the kernel's line of the engine restarts the pool:\n%s", daemonLog())
	assert.Contains(t, prop("LastError"), "Xid 31")
	assert.NotContains(t, daemonLog(), "not reading XIDs")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for ctx.Err() == nil && prop("Ready") != "b true" {
		time.Sleep(100 * time.Millisecond)
	}
	assert.Equal(t, "b true", prop("Ready"), "restarted")
}
