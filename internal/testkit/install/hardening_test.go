package install

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// The installed unit's capability bounding set, as systemctl names it:
// SETUID, SETGID (the shim drops to the engine user), SYS_RESOURCE (the
// shim's oom_score_adj), DAC_READ_SEARCH (hashing models of any owner),
// CHOWN (a staged copy keeps its source's owner and group).
const wantCaps = "cap_chown cap_dac_read_search cap_setgid cap_setuid cap_sys_resource"

func unitProperty(t *testing.T, name string) string {
	t.Helper()
	return strings.TrimPrefix(sh(t, "systemctl", "show", "-p", name, "pool-managerd.service"), name+"=")
}

func procStatus(t *testing.T, pid string) map[string]string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + pid + "/status")
	require.NoError(t, err)
	out := map[string]string{}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok {
			out[k] = strings.TrimSpace(v)
		}
	}
	return out
}

// capMask is the CapBnd mask of the named capabilities, as far as the
// system's own bounding set (PID 1's) has them.
func capMask(t *testing.T, names string) string {
	bits := map[string]uint{"cap_chown": 0, "cap_dac_override": 1, "cap_dac_read_search": 2, "cap_fowner": 3, "cap_kill": 5,
		"cap_setgid": 6, "cap_setuid": 7, "cap_sys_resource": 24}
	var m uint64
	for _, n := range strings.Fields(names) {
		b, ok := bits[n]
		require.True(t, ok, n)
		m |= 1 << b
	}
	system, err := strconv.ParseUint(procStatus(t, "1")["CapBnd"], 16, 64)
	require.NoError(t, err)
	return fmt.Sprintf("%016x", m&system)
}

// The installed unit keeps only the capabilities the code uses and its
// hardening directives; the daemon and an engine inside run under them (no
// new privileges, the bounding set, the system call filter, no namespaces),
// the engine's pool gets Ready, and a crash is still classified.
func TestInstalledUnitIsHardenedAndEnginesRunUnderIt(t *testing.T) {
	sandbox.Need(t)
	sim := os.Getenv(sandbox.BinEnv("pool-engine-sim"))
	// The engine first makes a call of the deny list (chroot, of @mount:
	// without the filter a missing directory fails first, with ENOENT),
	// then runs the simulator.
	probe := "/usr/local/bin/probe-engine"
	require.NoError(t, os.WriteFile(probe, []byte(`#!/bin/sh
echo "probe: $(chroot /nonexistent /bin/true 2>&1)"
exec `+sim+` "$@"
`), 0o755))
	t.Cleanup(func() { os.Remove(probe) })
	out, _ := exec.Command("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "chroot", "/nonexistent", "/bin/true").CombinedOutput()
	require.Contains(t, string(out), "No such file or directory", "outside the unit")

	installDeb(t, "", map[string][]byte{"hard": testpool.SimPoolFile(probe, "0", "tiny.gguf", 18461, "[Health]\nIntervalSec=0.5\nTimeoutSec=0.5\n")})
	waitReady(t, "hard")

	assert.Equal(t, wantCaps, unitProperty(t, "CapabilityBoundingSet"))
	for k, want := range map[string]string{
		"NoNewPrivileges":         "yes",
		"ProtectSystem":           "full",
		"ProtectHome":             "read-only",
		"PrivateMounts":           "yes",
		"RestrictNamespaces":      "yes",
		"UMask":                   "0022",
		"SystemCallErrorNumber":   "1",
		"SystemCallArchitectures": "native",
	} {
		assert.Equal(t, want, unitProperty(t, k), k)
	}
	for k, want := range map[string]string{
		"IPAddressDeny":           "0.0.0.0/0 ::/0",
		"IPAddressAllow":          "127.0.0.0/8 ::1/128",
		"RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
	} {
		assert.ElementsMatch(t, strings.Fields(want), strings.Fields(unitProperty(t, k)), k)
	}
	filter := unitProperty(t, "SystemCallFilter")
	require.True(t, strings.HasPrefix(filter, "~"), "a deny list: %s", filter)
	denied := strings.Fields(strings.TrimPrefix(filter, "~"))
	for _, call := range []string{"clock_settime", "modify_ldt", "init_module", "mount", "pivot_root", "ioperm", "reboot", "kexec_load", "swapon", "uselib"} {
		assert.Contains(t, denied, call)
	}
	// What engines need stays allowed: the shim's setuid, NUMA and CPU
	// pinning, GPU IPC handle sharing.
	for _, call := range []string{"setuid", "setgroups", "chown", "sched_setaffinity", "mbind", "setrlimit", "pidfd_getfd", "ptrace", "unshare"} {
		assert.NotContains(t, denied, call)
	}

	want := map[string]string{"CapBnd": capMask(t, wantCaps), "NoNewPrivs": "1", "Seccomp": "2"}
	daemon := procStatus(t, unitProperty(t, "MainPID"))
	engine := procStatus(t, strings.TrimPrefix(poolProperty("hard", "MainPID"), "u "))
	for k, v := range want {
		assert.Equal(t, v, daemon[k], "the daemon's %s", k)
		assert.Equal(t, v, engine[k], "the engine's %s", k)
	}
	assert.Equal(t, "0000000000000000", engine["CapEff"], "the engine has no capabilities")
	require.Eventually(t, func() bool {
		return strings.Contains(sh(t, "journalctl", "--no-pager", "-o", "cat", "-u", "pool-engine-hard.scope"), "probe: chroot: cannot change root directory to '/nonexistent': Operation not permitted")
	}, 10*time.Second, 100*time.Millisecond, "the engine ran under the system call filter, which answers EPERM:\n%s", journal())

	// A crash under the unit is classified and the pool comes back.
	pid, err := strconv.Atoi(strings.TrimPrefix(poolProperty("hard", "MainPID"), "u "))
	require.NoError(t, err)
	require.NoError(t, syscall.Kill(pid, syscall.SIGSEGV))
	require.Eventually(t, func() bool {
		b, err := os.ReadFile("/var/lib/prometheus/node-exporter/pool-managerd.prom")
		return err == nil && bytes.Contains(b, []byte(`pool_managerd_engine_crashes_total{pool_id="hard",reason="signal"} 1`))
	}, 30*time.Second, 100*time.Millisecond, "the crash counted as a signal:\n%s", journal())
	require.Eventually(t, func() bool {
		p := strings.TrimPrefix(poolProperty("hard", "MainPID"), "u ")
		return poolProperty("hard", "Ready") == "b true" && p != strconv.Itoa(pid) && p != "0"
	}, 60*time.Second, 100*time.Millisecond, "the pool restarted:\n%s", journal())

	// ProtectSystem=full leaves /etc read-only but for pools.d, where
	// Disable keeps its drop-in; systemctl reload answers through the bus.
	sh(t, "busctl", "call", "org.llorch.PoolManager1", "/org/llorch/PoolManager1", "org.llorch.PoolManager1.Manager", "Disable", "sb", "hard", "false")
	b, err := os.ReadFile("/etc/pool-managerd/pools.d/hard.pool.d/50-AutoStart.conf")
	require.NoError(t, err, journal())
	assert.Contains(t, string(b), "AutoStart=no")
	sh(t, "systemctl", "reload", "pool-managerd.service")
	assert.Equal(t, "b true", poolProperty("hard", "Ready"), "Disable and a reload leave a running pool alone")
}
