package bus_test

import (
	"context"
	"encoding/json"
	"encoding/xml"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/godbus/dbus/v5/introspect"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	api "github.com/llorch/pool-managerd/dbus"
	"github.com/llorch/pool-managerd/internal/bus"
	"github.com/llorch/pool-managerd/internal/shim"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// The daemon runs as pool-managerd.service (the unit in systemd/) with the
// bus policy in dbus/, in a sandbox with a real systemd and system bus; the
// tests drive it with busctl and a bus client, as an operator and a router
// would.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == healthEngineArg {
		os.Exit(healthEngine(os.Args[2:]))
	}
	if len(os.Args) > 1 && os.Args[1] == forgeArg {
		os.Exit(forge(os.Args[2:]))
	}
	if shim.Is() {
		os.Exit(shim.Main())
	}
	opts := testpool.Options
	opts.Prepare = append(opts.Prepare, []string{"groupadd", "--system", "pool-admin"})
	os.Exit(sandbox.Main(m, opts, sandbox.Build("github.com/llorch/pool-managerd/cmd/pool-managerd", "github.com/llorch/pool-managerd/cmd/pool-managerd-shim", testpool.Sim)))
}

func sh(t *testing.T, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		journal, _ := exec.Command("journalctl", "-u", "pool-managerd.service", "-n", "60", "--no-pager").CombinedOutput()
		require.NoError(t, err, "%s %v: %s\nthe daemon's journal:\n%s", name, args, out, journal)
	}
	return strings.TrimSpace(string(out))
}

func try(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

const mgr = "/org/llorch/PoolManager1"

func call(args ...string) (string, error) {
	return try("busctl", append([]string{"--timeout=60", "call", "org.llorch.PoolManager1", mgr, "org.llorch.PoolManager1.Manager"}, args...)...)
}

func getProp(t *testing.T, pool, name string) string {
	return sh(t, "busctl", "get-property", "org.llorch.PoolManager1", string(api.PoolPath(pool)), "org.llorch.PoolManager1.Pool", name)
}

// daemon installs the shipped unit and bus policy and starts the daemon on
// a configuration with one simulator pool; it returns the pool's port.
func daemon(t *testing.T, dropIn ...string) (dir string, port int) {
	t.Helper()
	dir, port = configure(t)
	start(t, dir, dropIn...)
	return dir, port
}

// configure writes the configuration daemon starts on.
func configure(t *testing.T) (dir string, port int) {
	t.Helper()
	sandbox.Need(t)
	dir, err := os.MkdirTemp("", "bus-test-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "pools.d"), 0o755))
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "models"), 0o755))
	for _, m := range []string{"a.gguf", "b.gguf"} {
		require.NoError(t, os.WriteFile(filepath.Join(dir, "models", m), []byte("GGUF\x03\x00\x00\x00 "+m), 0o644))
	}
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pool-managerd.conf"), []byte(fmt.Sprintf(`[Manager]
StateDir=%[1]s/state
RuntimeDir=%[1]s/run
CacheDir=%[1]s/cache
ModelsDir=%[1]s/models
MetricsTextfile=%[1]s/metrics/pool-managerd.prom
[Inventory]
Backend=static
Device=0 GPU-8f2c1a70-0000-4000-8000-000000000000 /dev/nvidia0
Device=1 GPU-8f2c1a70-0000-4000-8000-000000000001 /dev/nvidia1
Device=2 GPU-8f2c1a70-0000-4000-8000-000000000002 /dev/nvidia2
ControlDevice=/dev/nvidiactl
`, dir)), 0o644))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	port = l.Addr().(*net.TCPAddr).Port
	l.Close()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", "llama-8b.pool"), []byte(fmt.Sprintf(`[Pool]
Devices=0
Model=a.gguf
Slots=2
[Engine]
ExecStart=%s --model %%m --port %%p
Port=%d
StopTimeoutSec=2
Version=sim-1
[Health]
IntervalSec=0.2
TimeoutSec=0.2
[Restart]
BackoffInitialSec=0.2
`, os.Getenv(sandbox.BinEnv("pool-engine-sim")), port)), 0o644))
	return dir, port
}

// start installs the shipped unit and bus policy and starts the daemon on
// the configuration in dir.
func start(t *testing.T, dir string, dropIn ...string) {
	t.Helper()
	src, err := os.ReadFile("../../systemd/pool-managerd.service")
	require.NoError(t, err)
	unit := strings.Replace(string(src), "ExecStart=/usr/bin/pool-managerd",
		"ExecStart="+os.Getenv(sandbox.BinEnv("pool-managerd"))+" --config-dir "+dir, 1)
	require.NoError(t, os.WriteFile("/etc/systemd/system/pool-managerd.service", []byte(unit), 0o644))
	policy, err := os.ReadFile("../../dbus/org.llorch.PoolManager1.conf")
	require.NoError(t, err)
	require.NoError(t, os.WriteFile("/etc/dbus-1/system.d/org.llorch.PoolManager1.conf", policy, 0o644))
	sh(t, "systemctl", "reload", "dbus.service")
	catalog, err := os.ReadFile("../../packaging/pool-managerd.catalog")
	require.NoError(t, err)
	require.NoError(t, os.MkdirAll("/usr/lib/systemd/catalog", 0o755))
	require.NoError(t, os.WriteFile("/usr/lib/systemd/catalog/pool-managerd.catalog", catalog, 0o644))
	sh(t, "journalctl", "--update-catalog")
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "metrics"), 0o755))
	os.RemoveAll("/etc/systemd/system/pool-managerd.service.d")
	for i, d := range dropIn {
		require.NoError(t, os.MkdirAll("/etc/systemd/system/pool-managerd.service.d", 0o755))
		require.NoError(t, os.WriteFile(fmt.Sprintf("/etc/systemd/system/pool-managerd.service.d/%d.conf", i), []byte(d), 0o644))
	}
	sh(t, "systemctl", "daemon-reload")
	sh(t, "systemctl", "start", "pool-managerd.service")
	t.Cleanup(func() {
		exec.Command("systemctl", "stop", "pool-managerd.service").Run()
		exec.Command("systemctl", "stop", "pool-engine-llama\\x2d8b.scope").Run()
	})
}

func TestOperatorAndRouterOverTheBus(t *testing.T) {
	dir, _ := daemon(t)
	// Type=notify: active only after READY=1, with the pool started.
	assert.Equal(t, "active", sh(t, "systemctl", "show", "-p", "ActiveState", "--value", "pool-managerd.service"))
	require.Eventually(t, func() bool { return getProp(t, "llama-8b", "Ready") == "b true" }, 30*time.Second, 50*time.Millisecond)
	require.Eventually(t, func() bool {
		return sh(t, "systemctl", "show", "-p", "StatusText", "--value", "pool-managerd.service") == "1/1 pools ready"
	}, 10*time.Second, 50*time.Millisecond)

	out, err := call("ListPools")
	require.NoError(t, err, out)
	assert.Equal(t, `a(so) 1 "llama-8b" "/org/llorch/PoolManager1/pool/llama_2d8b"`, out)

	for name, want := range map[string]string{
		"Id": `s "llama-8b"`, "State": `s "ready"`, "Live": "b true", "Ready": "b true", "Draining": "b false",
		"ActiveLeases": "u 0", "Slots": "u 2", "Model": `s "a.gguf"`, "EngineVersion": `s "sim-1"`,
		"DeviceMask": `s "0"`, "CrashCount": "u 0", "RestartCount": "u 0",
		"BreakerState": `s "closed"`, "NextRestartUSec": "t 0", "Unit": `s "pool-engine-llama\\x2d8b.scope"`,
	} {
		assert.Equal(t, want, getProp(t, "llama-8b", name), name)
	}
	assert.Regexp(t, `^s "sha256:[0-9a-f]{64}"$`, getProp(t, "llama-8b", "ModelDigest"))
	assert.Regexp(t, `^u [1-9][0-9]*$`, getProp(t, "llama-8b", "MainPID"))
	// The static inventory looks for holders in /proc, and the unit has no
	// CAP_SYS_PTRACE to read other users' descriptors: the start goes
	// ahead and LastError says the look was blind, never that it passed.
	if le := getProp(t, "llama-8b", "LastError"); le != `s ""` {
		assert.Regexp(t, `^s "GPU check incomplete: could not check [1-9][0-9]* processes of other users`, le)
	}

	// A router's lease is its connection's: when it leaves the bus, the
	// lease goes and a pending drain completes.
	router, err := dbus.ConnectSystemBus()
	require.NoError(t, err)
	obj := router.Object(bus.Name, mgr)
	var lease string
	require.NoError(t, obj.Call(bus.ManagerIface+".AcquireLease", 0, "llama-8b").Store(&lease))
	assert.Equal(t, "u 1", getProp(t, "llama-8b", "ActiveLeases"))
	out, err = call("ReleaseLease", "s", lease)
	assert.Error(t, err)
	assert.Contains(t, out, "held by another owner", "another connection cannot release it")
	drained := make(chan string, 1)
	go func() {
		o, _ := call("Drain", "st", "llama-8b", "60000")
		drained <- o
	}()
	require.Eventually(t, func() bool { return getProp(t, "llama-8b", "Draining") == "b true" }, 10*time.Second, 20*time.Millisecond)
	out, err = call("AcquireLease", "s", "llama-8b")
	assert.Error(t, err)
	assert.Contains(t, out, "is draining")
	router.Close()
	select {
	case o := <-drained:
		assert.Equal(t, `s "drained"`, o)
	case <-time.After(30 * time.Second):
		t.Fatal("the drain did not complete when the lease holder left")
	}
	assert.Equal(t, `s "stopped"`, getProp(t, "llama-8b", "State"))

	// PropertiesChanged when Ready flips.
	watcher, err := dbus.ConnectSystemBus()
	require.NoError(t, err)
	defer watcher.Close()
	require.NoError(t, watcher.AddMatchSignal(dbus.WithMatchObjectPath(api.PoolPath("llama-8b")),
		dbus.WithMatchInterface("org.freedesktop.DBus.Properties"), dbus.WithMatchMember("PropertiesChanged")))
	sigs := make(chan *dbus.Signal, 64)
	watcher.Signal(sigs)
	out, err = call("Start", "s", "llama-8b")
	require.NoError(t, err, out)
	deadline := time.After(30 * time.Second)
	for ready := false; !ready; {
		select {
		case s := <-sigs:
			if changed, ok := s.Body[1].(map[string]dbus.Variant); ok {
				if v, ok := changed["Ready"]; ok && v.Value() == true {
					ready = true
				}
			}
		case <-deadline:
			t.Fatal("no PropertiesChanged with Ready=true")
		}
	}

	out, err = call("Reload", "sst", "llama-8b", "b.gguf", "30000")
	require.NoError(t, err, out)
	assert.Equal(t, `s "b.gguf"`, out)
	assert.Equal(t, `s "b.gguf"`, getProp(t, "llama-8b", "Model"))
	out, err = call("ResetBreaker", "s", "llama-8b")
	require.NoError(t, err, out)
	out, err = call("AllowRestart", "s", "llama-8b")
	assert.Contains(t, out, "no restart is pending")

	// Bad input: a clear error a script can match, nothing changes.
	client, err := dbus.ConnectSystemBus()
	require.NoError(t, err)
	defer client.Close()
	cobj := client.Object(bus.Name, mgr)
	for _, c := range []struct {
		method string
		args   []any
		want   string
	}{
		{"Drain", []any{"", uint64(1000)}, "InvalidArgument"},
		{"Drain", []any{strings.Repeat("x", 4096), uint64(1000)}, "InvalidArgument"},
		{"Drain", []any{"nope", uint64(1000)}, "NoSuchPool"},
		{"Drain", []any{"llama-8b", uint64(99999999999)}, "InvalidArgument"},
		{"Reload", []any{"llama-8b", "../etc/passwd", uint64(1000)}, "InvalidArgument"},
		{"Reload", []any{"llama-8b", "/nonexistent.gguf", uint64(1000)}, "InvalidArgument"},
		{"ReleaseLease", []any{"llama-8b/0000"}, "NoSuchLease"},
		{"AcquireLease", []any{"nope"}, "NoSuchPool"},
		{"AllowRestart", []any{"llama-8b"}, "NoRestartPending"},
	} {
		err := cobj.Call(bus.ManagerIface+"."+c.method, 0, c.args...).Err
		var de dbus.Error
		require.ErrorAs(t, err, &de, "%s %v", c.method, c.args)
		assert.Equal(t, bus.ErrorPrefix+c.want, de.Name, "%s: %v", c.method, de.Body)
	}
	assert.Equal(t, `s "ready"`, getProp(t, "llama-8b", "State"))
	assert.Equal(t, `s "b.gguf"`, getProp(t, "llama-8b", "Model"))

	// node_exporter's textfile: every family, with the drain and the
	// reload counted.
	var fams map[string]*dto.MetricFamily
	require.Eventually(t, func() bool {
		f, err := os.Open(filepath.Join(dir, "metrics", "pool-managerd.prom"))
		if err != nil {
			return false
		}
		defer f.Close()
		p := expfmt.NewTextParser(model.UTF8Validation)
		fams, err = p.TextToMetricFamilies(f)
		return err == nil && counter(fams, "pool_managerd_reload_success_total") == 1
	}, 20*time.Second, 100*time.Millisecond)
	for _, name := range []string{
		"drain_duration_seconds", "drains_total", "drain_force_stops_total", "reload_duration_seconds",
		"reload_success_total", "reload_failure_total", "engine_crashes_total", "backoff_delay_seconds",
		"restarts_scheduled_total", "circuit_breaker_opens_total", "circuit_breaker_state", "restart_storms_total",
		"restart_rate", "pool_ready", "pool_live", "pool_draining", "active_leases", "pool_info",
		"health_check_failures_total", "build_info",
	} {
		assert.Contains(t, fams, "pool_managerd_"+name)
	}
	assert.Equal(t, 1.0, counter(fams, "pool_managerd_drains_total"))
}

// counter sums a family's counter values.
func counter(fams map[string]*dto.MetricFamily, name string) float64 {
	sum := 0.0
	if f, ok := fams[name]; ok {
		for _, m := range f.GetMetric() {
			sum += m.GetCounter().GetValue()
		}
	}
	return sum
}

func TestUnprivilegedCallersMayOnlyRead(t *testing.T) {
	daemon(t)
	require.Eventually(t, func() bool { return getProp(t, "llama-8b", "Ready") == "b true" }, 30*time.Second, 50*time.Millisecond)
	nobody := func(args ...string) (string, error) {
		return try("setpriv", append([]string{"--reuid=65534", "--regid=65534", "--clear-groups", "busctl", "call",
			"org.llorch.PoolManager1", mgr, "org.llorch.PoolManager1.Manager"}, args...)...)
	}
	for _, args := range [][]string{
		{"Drain", "st", "llama-8b", "1000"},
		{"Reload", "sst", "llama-8b", "b.gguf", "1000"},
		{"Start", "s", "llama-8b"},
		{"Stop", "s", "llama-8b"},
		{"AcquireLease", "s", "llama-8b"},
		{"ReleaseLease", "s", "llama-8b/00"},
		{"ResetBreaker", "s", "llama-8b"},
		{"AllowRestart", "s", "llama-8b"},
		{"ReloadEx", "ssta{sv}", "llama-8b", "b.gguf", "1000", "0"},
		{"ReloadConfig"},
		{"Enable", "sb", "llama-8b", "false"},
		{"Disable", "sb", "llama-8b", "true"},
		{"EnsureReady", "st", "llama-8b", "1000"},
	} {
		out, err := nobody(args...)
		assert.Error(t, err, "%v", args)
		assert.Contains(t, out, "Access denied", "%v", args)
	}
	out, err := nobody("ListPools")
	require.NoError(t, err, out)
	out, err = try("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "busctl", "get-property",
		"org.llorch.PoolManager1", string(api.PoolPath("llama-8b")), "org.llorch.PoolManager1.Pool", "Ready")
	require.NoError(t, err, out)
	assert.Equal(t, "b true", out)
	assert.Equal(t, `s "ready"`, getProp(t, "llama-8b", "State"), "nothing changed")

	// With a bus policy that lets everyone through, the daemon still
	// refuses, and says who was refused.
	permissive := `<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><policy context="default"><allow send_destination="org.llorch.PoolManager1"/></policy></busconfig>`
	require.NoError(t, os.WriteFile("/etc/dbus-1/system.d/zz-permissive.conf", []byte(permissive), 0o644))
	defer func() {
		os.Remove("/etc/dbus-1/system.d/zz-permissive.conf")
		exec.Command("systemctl", "reload", "dbus.service").Run()
	}()
	sh(t, "systemctl", "reload", "dbus.service")
	// The bus reloads its policy asynchronously; busctl shows any access
	// denial alike, so the daemon's own journal entry tells them apart.
	require.Eventually(t, func() bool {
		out, err = nobody("Drain", "st", "llama-8b", "1000")
		j, _ := try("journalctl", "-u", "pool-managerd.service", "--no-pager", "-o", "cat")
		return err != nil && strings.Contains(j, "access denied: Drain by uid 65534")
	}, 10*time.Second, 100*time.Millisecond, out)
	assert.Equal(t, `s "ready"`, getProp(t, "llama-8b", "State"), "nothing changed")

	// A member of the admin group may.
	sh(t, "useradd", "--system", "--no-create-home", "-G", "pool-admin", "operator1")
	defer exec.Command("userdel", "operator1").Run()
	out, err = try("setpriv", "--reuid=operator1", "--regid=operator1", "--init-groups", "busctl", "call",
		"org.llorch.PoolManager1", mgr, "org.llorch.PoolManager1.Manager", "AcquireLease", "s", "llama-8b")
	require.NoError(t, err, out)
	assert.Contains(t, out, `s "llama-8b/`)
}

func TestDaemonRestartAdoptsEngines(t *testing.T) {
	_, port := daemon(t)
	require.Eventually(t, func() bool { return getProp(t, "llama-8b", "Ready") == "b true" }, 30*time.Second, 50*time.Millisecond)
	pid := getProp(t, "llama-8b", "MainPID")
	router, err := dbus.ConnectSystemBus()
	require.NoError(t, err)
	defer router.Close()
	var lease string
	require.NoError(t, router.Object(bus.Name, mgr).Call(bus.ManagerIface+".AcquireLease", 0, "llama-8b").Store(&lease))

	readyAgain := func(what string) {
		t.Helper()
		require.Eventually(t, func() bool {
			out, err := try("busctl", "get-property", "org.llorch.PoolManager1", string(api.PoolPath("llama-8b")), "org.llorch.PoolManager1.Pool", "Ready")
			return err == nil && out == "b true"
		}, 30*time.Second, 50*time.Millisecond, what)
		assert.Equal(t, pid, getProp(t, "llama-8b", "MainPID"), "%s: the engine was adopted, not restarted", what)
	}
	sh(t, "systemctl", "restart", "pool-managerd.service")
	readyAgain("after systemctl restart")
	assert.Equal(t, "u 1", getProp(t, "llama-8b", "ActiveLeases"), "the lease of a client still on the bus is kept")

	// A client that leaves while no daemon runs loses its lease.
	gone, err := dbus.ConnectSystemBus()
	require.NoError(t, err)
	require.NoError(t, gone.Object(bus.Name, mgr).Call(bus.ManagerIface+".AcquireLease", 0, "llama-8b").Err)
	require.Eventually(t, func() bool { return getProp(t, "llama-8b", "ActiveLeases") == "u 2" }, 5*time.Second, 20*time.Millisecond)
	sh(t, "systemctl", "stop", "pool-managerd.service")
	gone.Close()
	sh(t, "systemctl", "start", "pool-managerd.service")
	readyAgain("after stop and start")
	assert.Equal(t, "u 1", getProp(t, "llama-8b", "ActiveLeases"), "only the connected client's lease is kept")
	// A lease kept across the restart is still its owner's: it goes when
	// the owner leaves.
	router.Close()
	require.Eventually(t, func() bool { return getProp(t, "llama-8b", "ActiveLeases") == "u 0" }, 5*time.Second, 20*time.Millisecond,
		"the adopted lease is released when its owner leaves the bus")
	sh(t, "systemctl", "kill", "--signal=KILL", "pool-managerd.service")
	require.Eventually(t, func() bool {
		out, _ := try("systemctl", "show", "-p", "NRestarts", "--value", "pool-managerd.service")
		return out == "1"
	}, 20*time.Second, 50*time.Millisecond, "systemd restarts the killed daemon")
	readyAgain("after kill -9")

	// A crash of the adopted engine is still seen and restarted.
	resp, err := http.Post(fmt.Sprintf("http://127.0.0.1:%d/sim/fault?kind=segv", port), "", nil)
	require.NoError(t, err)
	resp.Body.Close()
	require.Eventually(t, func() bool {
		return getProp(t, "llama-8b", "CrashCount") == "u 1" && getProp(t, "llama-8b", "Ready") == "b true"
	}, 30*time.Second, 50*time.Millisecond)
	assert.NotEqual(t, pid, getProp(t, "llama-8b", "MainPID"))
	assert.Equal(t, `s "killed by SIGSEGV"`, getProp(t, "llama-8b", "LastError"))

	// The crash in the journal, with its fields and its catalog entry.
	var crash map[string]any
	for _, line := range strings.Split(sh(t, "journalctl", "-u", "pool-managerd.service", "-o", "json", "--no-pager"), "\n") {
		var e map[string]any
		if json.Unmarshal([]byte(line), &e) == nil && e["MESSAGE_ID"] == "b7d7597cfa114df0a87d0da1ee5155ee" {
			crash = e
		}
	}
	require.NotNil(t, crash, "a crash entry with its MESSAGE_ID")
	assert.Equal(t, "llama-8b", crash["POOL_ID"])
	assert.Equal(t, "signal", crash["CRASH_REASON"])
	assert.Equal(t, "SIGSEGV", crash["EXIT_SIGNAL"])
	assert.Equal(t, "3", crash["PRIORITY"])
	assert.Contains(t, sh(t, "journalctl", "-x", "-u", "pool-managerd.service", "--no-pager"),
		"Subject: Inference engine of pool llama-8b crashed (signal)")
}

func TestConfigurationReload(t *testing.T) {
	dir, _ := daemon(t)
	require.Eventually(t, func() bool { return getProp(t, "llama-8b", "Ready") == "b true" }, 30*time.Second, 50*time.Millisecond)
	pid := getProp(t, "llama-8b", "MainPID")
	journal := func() string {
		// Each entry's message, then its ERROR field: the reason.
		out, _ := try("journalctl", "-u", "pool-managerd.service", "--no-pager", "-o", "json")
		var text strings.Builder
		for line := range strings.Lines(out) {
			var e map[string]any
			if json.Unmarshal([]byte(line), &e) == nil {
				fmt.Fprintln(&text, e["MESSAGE"], e["ERROR"])
			}
		}
		return text.String()
	}

	// A bad configuration changes nothing and says why.
	bad := filepath.Join(dir, "pools.d", "bad.pool")
	require.NoError(t, os.WriteFile(bad, []byte("[Pool]\nDevices=1\nModel=b.gguf\nColour=blue\n"), 0o644))
	// systemctl reload fails, and the reason is in the journal.
	out, err := try("systemctl", "reload", "pool-managerd.service")
	require.Error(t, err, out)
	require.Eventually(t, func() bool { return strings.Contains(journal(), "configuration reload refused") }, 10*time.Second, 50*time.Millisecond)
	assert.Contains(t, journal(), "bad.pool:4: [Pool] Colour=: unknown key in [Pool]")
	// The bus call says why, as an invalid argument.
	out, err = call("ReloadConfig")
	require.Error(t, err)
	assert.Contains(t, out, "bad.pool:4: [Pool] Colour=: unknown key in [Pool]")
	assert.Contains(t, out, "the running configuration stays")
	client, err := dbus.ConnectSystemBus()
	require.NoError(t, err)
	defer client.Close()
	var dbusErr dbus.Error
	require.ErrorAs(t, client.Object(bus.Name, mgr).Call(bus.ManagerIface+".ReloadConfig", 0).Err, &dbusErr)
	assert.Equal(t, api.ErrInvalidArgument, dbusErr.Name)
	// SIGHUP still reloads, and journals the refusal.
	sh(t, "systemctl", "kill", "--signal=HUP", "--kill-whom=main", "pool-managerd.service")
	require.Eventually(t, func() bool { return strings.Count(journal(), "configuration reload refused") >= 3 }, 10*time.Second, 50*time.Millisecond)
	assert.Equal(t, "b true", getProp(t, "llama-8b", "Ready"), "the old pools keep serving")
	assert.Equal(t, "active", sh(t, "systemctl", "is-active", "pool-managerd.service"))
	assert.Equal(t, pid, getProp(t, "llama-8b", "MainPID"))
	out, err = call("ListPools")
	require.NoError(t, err)
	assert.NotContains(t, out, "bad")
	require.NoError(t, os.Remove(bad))

	// Added pools start; removed pools are drained and stopped.
	src, err := os.ReadFile(filepath.Join(dir, "pools.d", "llama-8b.pool"))
	require.NoError(t, err)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	port2 := l.Addr().(*net.TCPAddr).Port
	l.Close()
	second := strings.Replace(strings.Replace(string(src), "Devices=0", "Devices=1", 1), "Port=", fmt.Sprintf("Port=%d\n#", port2), 1)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", "second.pool"), []byte(second), 0o644))
	require.NoError(t, os.Remove(filepath.Join(dir, "pools.d", "llama-8b.pool")))
	// systemctl reload answers once the configuration is applied.
	sh(t, "systemctl", "reload", "pool-managerd.service")
	out, err = call("ListPools")
	require.NoError(t, err)
	assert.Equal(t, `a(so) 1 "second" "/org/llorch/PoolManager1/pool/second"`, out)
	require.Eventually(t, func() bool {
		out, err := try("busctl", "get-property", "org.llorch.PoolManager1", string(api.PoolPath("second")), "org.llorch.PoolManager1.Pool", "Ready")
		return err == nil && out == "b true"
	}, 30*time.Second, 50*time.Millisecond)
	n := strings.TrimPrefix(pid, "u ")
	_, err = os.Stat("/proc/" + n)
	assert.True(t, os.IsNotExist(err), "the removed pool's engine is gone")

	// A changed pool starts again on its new configuration.
	pid2 := getProp(t, "second", "MainPID")
	second = strings.Replace(second, "Slots=2", "Slots=3", 1)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", "second.pool"), []byte(second), 0o644))
	sh(t, "systemctl", "reload", "pool-managerd.service")
	require.Eventually(t, func() bool {
		out, err := try("busctl", "get-property", "org.llorch.PoolManager1", string(api.PoolPath("second")), "org.llorch.PoolManager1.Pool", "Slots")
		return err == nil && out == "u 3" && getProp(t, "second", "Ready") == "b true"
	}, 30*time.Second, 50*time.Millisecond)
	assert.NotEqual(t, pid2, getProp(t, "second", "MainPID"))
	assert.Equal(t, "1/1 pools ready", sh(t, "systemctl", "show", "-p", "StatusText", "--value", "pool-managerd.service"))
	exec.Command("systemctl", "stop", "pool-engine-second.scope").Run()
}

func TestWatchdogIsPetted(t *testing.T) {
	daemon(t, "[Service]\nWatchdogSec=1\n")
	require.Eventually(t, func() bool { return getProp(t, "llama-8b", "Ready") == "b true" }, 30*time.Second, 50*time.Millisecond)
	start := time.Now()
	// Over three watchdog periods the daemon is neither killed nor restarted.
	for time.Since(start) < 3*time.Second {
		assert.Equal(t, "active", sh(t, "systemctl", "is-active", "pool-managerd.service"))
		assert.Equal(t, "0", sh(t, "systemctl", "show", "-p", "NRestarts", "--value", "pool-managerd.service"))
		time.Sleep(250 * time.Millisecond)
	}
	assert.NotContains(t, sh(t, "journalctl", "-u", "pool-managerd.service", "--no-pager"), "Watchdog timeout")
}

func TestEngineOfPoolRemovedWhileDownIsStopped(t *testing.T) {
	dir, _ := daemon(t)
	require.Eventually(t, func() bool { return getProp(t, "llama-8b", "Ready") == "b true" }, 30*time.Second, 50*time.Millisecond)
	pid := strings.TrimPrefix(getProp(t, "llama-8b", "MainPID"), "u ")
	sh(t, "systemctl", "stop", "pool-managerd.service")
	_, err := os.Stat("/proc/" + pid)
	require.NoError(t, err, "the engine outlives the daemon")
	require.NoError(t, os.Remove(filepath.Join(dir, "pools.d", "llama-8b.pool")))
	sh(t, "systemctl", "start", "pool-managerd.service")
	_, err = os.Stat("/proc/" + pid)
	assert.True(t, os.IsNotExist(err), "the engine of the removed pool is stopped")
	out, _ := try("systemctl", "is-active", "pool-engine-llama\\x2d8b.scope")
	assert.NotEqual(t, "active", out)
}

func TestServedIntrospectionIsTheShippedOne(t *testing.T) {
	daemon(t)
	for path, file := range map[string]string{mgr: "org.llorch.PoolManager1.Manager.xml", string(api.PoolPath("llama-8b")): "org.llorch.PoolManager1.Pool.xml"} {
		served := sh(t, "busctl", "introspect", "--xml-interface", "org.llorch.PoolManager1", path)
		shippedXML, err := os.ReadFile(filepath.Join("../../dbus", file))
		require.NoError(t, err)
		var a, b introspect.Node
		require.NoError(t, xml.Unmarshal([]byte(served), &a))
		require.NoError(t, xml.Unmarshal(shippedXML, &b))
		var got *introspect.Interface
		for i := range a.Interfaces {
			if a.Interfaces[i].Name == b.Interfaces[0].Name {
				got = &a.Interfaces[i]
			}
		}
		require.NotNil(t, got, "%s serves %s", path, b.Interfaces[0].Name)
		assert.Equal(t, b.Interfaces[0].Methods, got.Methods, path)
		assert.Equal(t, b.Interfaces[0].Properties, got.Properties, path)
	}
}

func waitProp(t *testing.T, pool, name, want string) {
	t.Helper()
	require.Eventually(t, func() bool {
		out, err := try("busctl", "get-property", "org.llorch.PoolManager1", string(api.PoolPath(pool)), "org.llorch.PoolManager1.Pool", name)
		return err == nil && out == want
	}, 30*time.Second, 20*time.Millisecond, "%s %s = %s", pool, name, want)
}

func killDaemon(t *testing.T, restarts string) {
	t.Helper()
	sh(t, "systemctl", "kill", "--signal=KILL", "pool-managerd.service")
	require.Eventually(t, func() bool {
		out, _ := try("systemctl", "show", "-p", "NRestarts", "--value", "pool-managerd.service")
		a, _ := try("systemctl", "is-active", "pool-managerd.service")
		return out == restarts && a == "active"
	}, 30*time.Second, 20*time.Millisecond, "systemd restarts the killed daemon")
}

// A GPU whose device node is missing: the pool says so and does not run
// an engine without its GPU; the other pools are not affected.
func TestGPUNodeMissing(t *testing.T) {
	dir, _ := daemon(t)
	waitProp(t, "llama-8b", "Ready", "b true")
	src, err := os.ReadFile(filepath.Join(dir, "pools.d", "llama-8b.pool"))
	require.NoError(t, err)
	ghost := strings.Replace(strings.Replace(string(src), "Devices=0", "Devices=2", 1), "Port=", "Port=1\n#", 1)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", "ghost.pool"), []byte(ghost), 0o644))
	sh(t, "systemctl", "reload", "pool-managerd.service")
	waitProp(t, "ghost", "State", `s "failed"`)
	assert.Contains(t, getProp(t, "ghost", "LastError"), "GPU device node /dev/nvidia2 is missing")
	assert.Equal(t, "b false", getProp(t, "ghost", "Live"))
	assert.Equal(t, "b true", getProp(t, "llama-8b", "Ready"))
}

// The daemon killed while a drain waits for a lease: the new daemon adopts
// the engine with the lease of the still-connected client; nothing is lost.
func TestDaemonKilledMidDrain(t *testing.T) {
	dir, _ := daemon(t)
	waitProp(t, "llama-8b", "Ready", "b true")
	pid := getProp(t, "llama-8b", "MainPID")
	router, err := dbus.ConnectSystemBus()
	require.NoError(t, err)
	defer router.Close()
	var lease string
	require.NoError(t, router.Object(bus.Name, mgr).Call(bus.ManagerIface+".AcquireLease", 0, "llama-8b").Store(&lease))
	require.Eventually(t, func() bool {
		b, err := os.ReadFile(filepath.Join(dir, "run", "pools", "llama-8b.json"))
		return err == nil && strings.Contains(string(b), lease)
	}, 10*time.Second, 20*time.Millisecond, "the lease reaches the runtime record")
	drainDone := make(chan error, 1)
	go func() {
		_, err := call("Drain", "st", "llama-8b", "60000")
		drainDone <- err
	}()
	waitProp(t, "llama-8b", "Draining", "b true")
	killDaemon(t, "1")
	assert.Error(t, <-drainDone, "the drain's caller learns the daemon went away")
	waitProp(t, "llama-8b", "Ready", "b true")
	assert.Equal(t, pid, getProp(t, "llama-8b", "MainPID"), "the engine was adopted, not restarted")
	assert.Equal(t, "u 1", getProp(t, "llama-8b", "ActiveLeases"), "the connected client's lease is kept")
	assert.Equal(t, "u 0", getProp(t, "llama-8b", "CrashCount"))
	require.NoError(t, router.Object(bus.Name, mgr).Call(bus.ManagerIface+".ReleaseLease", 0, lease).Err)
}

// The daemon killed while a reload waits for its new engine: the new daemon
// kills that engine and starts the pool on its configured model.
func TestDaemonKilledMidReload(t *testing.T) {
	dir, _ := daemon(t)
	waitProp(t, "llama-8b", "Ready", "b true")
	require.NoError(t, os.WriteFile(filepath.Join(dir, "models", "slow.gguf"), []byte("GGUF\x03\x00\x00\x00\nsim-fault=hang-health\n"), 0o644))
	reloadDone := make(chan error, 1)
	go func() {
		_, err := call("Reload", "sst", "llama-8b", "slow.gguf", "30000")
		reloadDone <- err
	}()
	waitProp(t, "llama-8b", "State", `s "starting"`)
	killDaemon(t, "1")
	assert.Error(t, <-reloadDone)
	waitProp(t, "llama-8b", "Ready", "b true")
	assert.Equal(t, `s "a.gguf"`, getProp(t, "llama-8b", "Model"))
	out, _ := try("pgrep", "-c", "-f", "pool-engine-sim")
	assert.Equal(t, "1", out, "the half-started engine is gone")
}

// The daemon killed while an engine loads its model (it has no runtime
// record yet): the new daemon adopts the loading engine from what its shim
// kept, with no second load, and it becomes ready.
func TestDaemonKilledWhileEngineStarts(t *testing.T) {
	dir, _ := daemon(t)
	waitProp(t, "llama-8b", "Ready", "b true")
	require.NoError(t, os.WriteFile(filepath.Join(dir, "models", "big.gguf"), []byte("GGUF\x03\x00\x00\x00\nsim-load-time=4s\n"), 0o644))
	conf := filepath.Join(dir, "pools.d", "llama-8b.pool")
	src, err := os.ReadFile(conf)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(conf, []byte(strings.Replace(string(src), "Model=a.gguf", "Model=big.gguf", 1)), 0o644))
	sh(t, "systemctl", "reload", "pool-managerd.service")
	waitProp(t, "llama-8b", "Model", `s "big.gguf"`)
	waitProp(t, "llama-8b", "Live", "b true")
	require.Equal(t, `s "starting"`, getProp(t, "llama-8b", "State"))
	pid := getProp(t, "llama-8b", "MainPID")
	killDaemon(t, "1")
	waitProp(t, "llama-8b", "Ready", "b true")
	assert.Equal(t, pid, getProp(t, "llama-8b", "MainPID"), "the loading engine was adopted, not started again")
	assert.Equal(t, `s "big.gguf"`, getProp(t, "llama-8b", "Model"))
	if !assert.Equal(t, "u 0", getProp(t, "llama-8b", "CrashCount")) {
		j, _ := try("journalctl", "--no-pager", "-o", "short-monotonic", "-n", "300")
		t.Log(j)
	}
	out, _ := try("pgrep", "-c", "-f", "pool-engine-sim")
	assert.Equal(t, "1", out, "one engine, the adopted one")
	out, _ = try("journalctl", "-u", "pool-managerd.service", "--no-pager", "-o", "cat")
	assert.Contains(t, out, "that was starting")
}
