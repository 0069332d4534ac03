package bus_test

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/godbus/dbus/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	api "github.com/llorch/pool-managerd/dbus"
	"github.com/llorch/pool-managerd/internal/bus"
	"github.com/llorch/pool-managerd/internal/safetext"
)

// healthEngineArg makes this test binary an engine whose /health answers
// 200 or, while the file named by --answer exists, 503 with that file's
// bytes: an engine that says what it likes.
const healthEngineArg = "health-engine"

func healthEngine(args []string) int {
	fs := flag.NewFlagSet(healthEngineArg, flag.ContinueOnError)
	port := fs.Int("port", 0, "port to listen on")
	answer := fs.String("answer", "", "file whose bytes /health answers with 503")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/health", func(w http.ResponseWriter, r *http.Request) {
		if b, err := os.ReadFile(*answer); err == nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			w.Write(b)
			return
		}
		io.WriteString(w, `{"status":"ok"}`)
	})
	fmt.Fprintln(os.Stderr, http.ListenAndServe(fmt.Sprintf("127.0.0.1:%d", *port), mux))
	return 1
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// journalHas reports whether the daemon's journal has a line containing s.
func journalHas(s string) bool {
	out, _ := try("journalctl", "-u", "pool-managerd.service", "--no-pager", "-o", "cat")
	return strings.Contains(out, s)
}

// A NameOwnerChanged sent by another user, to everyone or to the daemon
// alone, naming the router's connection as gone, releases none of its
// leases: only the bus can say a connection left.
func TestForgedNameOwnerChangedKeepsLease(t *testing.T) {
	daemon(t)
	waitProp(t, "llama-8b", "Ready", "b true")
	sh(t, "useradd", "--system", "--no-create-home", "mallory")
	t.Cleanup(func() { exec.Command("userdel", "mallory").Run() })

	router, err := dbus.ConnectSystemBus()
	require.NoError(t, err)
	defer router.Close()
	var lease string
	require.NoError(t, router.Object(bus.Name, mgr).Call(bus.ManagerIface+".AcquireLease", 0, "llama-8b").Store(&lease))
	waitProp(t, "llama-8b", "ActiveLeases", "u 1")
	routerName := router.Names()[0]
	var daemonName string
	require.NoError(t, router.BusObject().Call("org.freedesktop.DBus.GetNameOwner", 0, bus.Name).Store(&daemonName))

	// A monitor sees every NameOwnerChanged in the order the bus delivers
	// it, also one sent to the daemon alone.
	monitor, err := dbus.ConnectSystemBus()
	require.NoError(t, err)
	defer monitor.Close()
	seen := make(chan *dbus.Signal, 256)
	monitor.Signal(seen)
	require.NoError(t, monitor.BusObject().Call("org.freedesktop.DBus.Monitoring.BecomeMonitor", 0,
		[]string{"type='signal',interface='org.freedesktop.DBus',member='NameOwnerChanged'"}, uint32(0)).Err)

	// busDispatched waits until the bus has passed the forgery on: after
	// it, it passes on the departure of a client that leaves later.
	busDispatched := func(t *testing.T) {
		deadline := time.After(10 * time.Second)
		for {
			select {
			case sig := <-seen:
				if sig.Sender != "org.freedesktop.DBus" && len(sig.Body) == 3 && sig.Body[0] == routerName {
					return
				}
			case <-deadline:
				require.FailNow(t, "the bus did not pass the forged NameOwnerChanged on")
			}
		}
	}
	// daemonHandled waits until the daemon has handled a forgery sent to
	// it alone (a monitor does not see those): ignored it, or released the
	// router's leases.
	ignored := func() int {
		out, _ := try("journalctl", "-u", "pool-managerd.service", "--no-pager", "-o", "cat")
		return strings.Count(out, "ignored a NameOwnerChanged that the bus did not send")
	}
	daemonHandled := func(before int) func(*testing.T) {
		return func(t *testing.T) {
			require.Eventually(t, func() bool { return ignored() > before || journalHas("of "+routerName+":") },
				10*time.Second, 50*time.Millisecond, "the daemon handles the forged NameOwnerChanged")
		}
	}

	for _, c := range []struct {
		name    string
		to      []string
		handled func(*testing.T)
	}{
		{"to everyone", nil, busDispatched},
		{"to the daemon alone", []string{"--destination=" + daemonName}, daemonHandled(ignored())},
	} {
		t.Run(c.name, func(t *testing.T) {
			// A second client whose real departure comes after the forgery.
			other, err := dbus.ConnectSystemBus()
			require.NoError(t, err)
			defer other.Close()
			require.NoError(t, other.Object(bus.Name, mgr).Call(bus.ManagerIface+".AcquireLease", 0, "llama-8b").Err)
			waitProp(t, "llama-8b", "ActiveLeases", "u 2")

			args := append([]string{"--reuid=mallory", "--regid=mallory", "--clear-groups", "busctl", "emit"}, c.to...)
			args = append(args, "/org/freedesktop/DBus", "org.freedesktop.DBus", "NameOwnerChanged", "sss", routerName, routerName, "")
			sh(t, "setpriv", args...)
			c.handled(t)

			// The bus delivers the real departure after the forgery, and
			// the daemon handles departures in order.
			otherName := other.Names()[0]
			other.Close()
			require.Eventually(t, func() bool { return journalHas(fmt.Sprintf("released 1 lease(s) of %s", otherName)) },
				10*time.Second, 50*time.Millisecond, "the real departure is handled")
			assert.Equal(t, "u 1", getProp(t, "llama-8b", "ActiveLeases"), "the router's lease is kept")
			assert.False(t, journalHas("of "+routerName+":"), "no lease of the router was released")
		})
	}
	require.NoError(t, router.Object(bus.Name, mgr).Call(bus.ManagerIface+".ReleaseLease", 0, lease).Err,
		"the router still holds its lease")
	waitProp(t, "llama-8b", "ActiveLeases", "u 0")
}

// An engine's text with bytes the bus refuses (invalid UTF-8, NUL), with
// terminal escapes, or of any length reaches LastError valid and bounded:
// PropertiesChanged goes on (Ready included) and GetAll answers.
func TestEngineTextCannotBreakTheBus(t *testing.T) {
	// Only these pools: a reload that stops an engine is not under test.
	dir, _ := configure(t)
	exe, err := os.Executable()
	require.NoError(t, err)
	engine := filepath.Join(dir, "engine")
	sh(t, "cp", exe, engine)
	require.NoError(t, os.Chmod(engine, 0o755))

	type pool struct{ id, healthURL, answer, wantIn, wantEnd string }
	pools := []pool{
		{"babel", "", "\xff\xfeoops\x00\x1b[2J\u202e", "answered 503 \ufffd\ufffdoops\\x00\\x1b[2J\\u202e); ", "SIGTERM"},
		{"verbose", "HealthURL=http://127.0.0.1:%p/health?pad=" + strings.Repeat("x", 1500) + "\n", "busy", "health check failed", "xxx…"},
	}
	require.NoError(t, os.Remove(filepath.Join(dir, "pools.d", "llama-8b.pool")))
	for i, p := range pools {
		require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", p.id+".pool"), []byte(fmt.Sprintf(`[Pool]
Devices=%d
Model=a.gguf
[Engine]
ExecStart=%s %s --port %%p --answer %s
Port=%d
StopTimeoutSec=2
Version=answers-1
%s[Health]
IntervalSec=0.5
TimeoutSec=0.5
FailureThreshold=1
StartTimeoutSec=30
[Restart]
BackoffInitialSec=0.2
`, i, engine, healthEngineArg, filepath.Join(dir, p.id+".answer"), freePort(t), p.healthURL)), 0o644))
	}
	t.Cleanup(func() {
		// Engines outlive the daemon: it goes first.
		exec.Command("systemctl", "stop", "pool-managerd.service").Run()
		for _, p := range pools {
			exec.Command("systemctl", "stop", "pool-engine-"+p.id+".scope").Run()
		}
	})
	start(t, dir)
	for _, p := range pools {
		waitProp(t, p.id, "Ready", "b true")
	}

	for _, p := range pools {
		t.Run(p.id, func(t *testing.T) {
			watcher, err := dbus.ConnectSystemBus()
			require.NoError(t, err)
			defer watcher.Close()
			require.NoError(t, watcher.AddMatchSignal(dbus.WithMatchObjectPath(api.PoolPath(p.id)),
				dbus.WithMatchInterface("org.freedesktop.DBus.Properties"), dbus.WithMatchMember("PropertiesChanged")))
			sigs := make(chan *dbus.Signal, 256)
			watcher.Signal(sigs)
			// next waits for a change of one property to a value that
			// holds ok and returns it.
			next := func(name, what string, ok func(any) bool) any {
				deadline := time.After(30 * time.Second)
				for {
					select {
					case s := <-sigs:
						if changed, _ := s.Body[1].(map[string]dbus.Variant); changed != nil {
							if v, found := changed[name]; found && ok(v.Value()) {
								return v.Value()
							}
						}
					case <-deadline:
						require.FailNow(t, "no PropertiesChanged: "+what)
					}
				}
			}

			answer := filepath.Join(dir, p.id+".answer")
			require.NoError(t, os.WriteFile(answer, []byte(p.answer), 0o644))
			// A probe that a busy machine answers late fails too: its
			// LastError is not the one looked for.
			lastError, _ := next("LastError", "the failed health check's LastError", func(v any) bool {
				s, _ := v.(string)
				return strings.Contains(s, p.wantIn)
			}).(string)
			require.NoError(t, os.Remove(answer))
			assert.True(t, utf8.ValidString(lastError), "%q", lastError)
			assert.LessOrEqual(t, len(lastError), safetext.Max)
			assert.Contains(t, lastError, p.wantIn)
			assert.True(t, strings.HasSuffix(lastError, p.wantEnd), "%q ends with %q", lastError, p.wantEnd)
			next("Ready", "Ready again once the engine is healthy", func(v any) bool { return v == true })

			// GetAll answers, within a bound, with safe text.
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			var all map[string]dbus.Variant
			require.NoError(t, watcher.Object(bus.Name, api.PoolPath(p.id)).CallWithContext(ctx,
				"org.freedesktop.DBus.Properties.GetAll", 0, bus.PoolIface).Store(&all))
			got, _ := all["LastError"].Value().(string)
			assert.True(t, utf8.ValidString(got), "%q", got)
			assert.LessOrEqual(t, len(got), safetext.Max)
		})
	}
	out, err := call("ListPools")
	require.NoError(t, err, "the daemon is still on the bus: %s", out)
}

// An admin's Reload reaches only the model directories: not a file
// elsewhere, not through a symlink, and the file refused is untouched;
// ModelDirs= opens another directory.
func TestReloadRefsStayWithinTheModelDirectories(t *testing.T) {
	dir, _ := daemon(t)
	waitProp(t, "llama-8b", "Ready", "b true")
	outside := filepath.Join(dir, "outside")
	require.NoError(t, os.MkdirAll(outside, 0o755))
	secret := filepath.Join(outside, "secret.gguf")
	require.NoError(t, os.WriteFile(secret, []byte("GGUF\x03\x00\x00\x00 not for the bus"), 0o640))
	require.NoError(t, os.Symlink(secret, filepath.Join(dir, "models", "link.gguf")))

	admin, err := dbus.ConnectSystemBus()
	require.NoError(t, err)
	defer admin.Close()
	obj := admin.Object("org.llorch.PoolManager1", mgr)
	for _, ref := range []string{secret, "file://" + secret, "link.gguf", "../outside/secret.gguf"} {
		err := obj.Call(bus.ManagerIface+".Reload", 0, "llama-8b", ref, uint64(1000)).Err
		var de dbus.Error
		require.ErrorAs(t, err, &de, ref)
		assert.Equal(t, bus.ErrorPrefix+"InvalidArgument", de.Name, ref)
	}
	out, _ := call("Reload", "sst", "llama-8b", secret, "1000")
	assert.Contains(t, out, "not beneath an allowed model directory")
	assert.Equal(t, `s "a.gguf"`, getProp(t, "llama-8b", "Model"), "a refused ref changes nothing")
	st, err := os.Stat(secret)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o640), st.Mode().Perm(), "the refused file's mode is untouched")
	staged, _ := filepath.Glob(filepath.Join(dir, "state", "staged", "*", "secret.gguf"))
	assert.Empty(t, staged, "nothing of it was staged")

	// The operator names the directory: now it is a model directory.
	require.NoError(t, os.Chmod(secret, 0o644))
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "pool-managerd.conf.d"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pool-managerd.conf.d", "models.conf"),
		[]byte("[Manager]\nModelDirs="+outside+"\n"), 0o644))
	sh(t, "systemctl", "restart", "pool-managerd.service")
	waitProp(t, "llama-8b", "Ready", "b true")
	out, err = call("Reload", "sst", "llama-8b", secret, "1000")
	require.NoError(t, err, out)
	assert.Equal(t, `s "`+secret+`"`, getProp(t, "llama-8b", "Model"))
}

// The admin group is not root: an admin's Reload names only a model the
// admin could read itself, and is told nothing more of one it could not
// (not even whether it exists), though the engines may read it; root's
// Reload of it stands. Staged models are closed to the admin too.
func TestAdminReloadsOnlyWhatItCouldRead(t *testing.T) {
	dir, _ := daemon(t)
	waitProp(t, "llama-8b", "Ready", "b true")
	enginesOnly := filepath.Join(dir, "models", "engines-only")
	require.NoError(t, os.Mkdir(enginesOnly, 0o750))
	require.NoError(t, os.WriteFile(filepath.Join(enginesOnly, "x.gguf"), []byte("GGUF\x03\x00\x00\x00 for the engines"), 0o644))
	sh(t, "chgrp", "pool-engine", enginesOnly)
	sh(t, "useradd", "--system", "--no-create-home", "-G", "pool-admin", "operator2")
	t.Cleanup(func() { exec.Command("userdel", "operator2").Run() })
	uid := sh(t, "id", "-u", "operator2")
	asAdmin := func(args ...string) (string, error) {
		return try("setpriv", append([]string{"--reuid=operator2", "--regid=operator2", "--init-groups", "busctl", "--timeout=60", "call",
			"org.llorch.PoolManager1", mgr, "org.llorch.PoolManager1.Manager"}, args...)...)
	}

	for _, ref := range []string{"engines-only/x.gguf", "engines-only/missing.gguf", filepath.Join(enginesOnly, "x.gguf")} {
		out, err := asAdmin("Reload", "sst", "llama-8b", ref, "1000")
		require.Error(t, err, ref)
		// The reason is that and nothing more: no mode, owner or type.
		assert.True(t, strings.HasSuffix(out, ": not found or not readable by the caller (uid "+uid+")"), "%s: %s", ref, out)
		assert.Contains(t, out, "invalid argument: model ", ref)
	}
	assert.Equal(t, `s "a.gguf"`, getProp(t, "llama-8b", "Model"), "a refused ref changes nothing")
	staged, _ := filepath.Glob(filepath.Join(dir, "state", "staged", "*", "x.gguf"))
	assert.Empty(t, staged, "nothing of it was staged")

	out, err := asAdmin("Reload", "sst", "llama-8b", "b.gguf", "1000")
	require.NoError(t, err, "what the admin may read, it may name: %s", out)
	assert.Equal(t, `s "b.gguf"`, getProp(t, "llama-8b", "Model"))
	out, err = call("Reload", "sst", "llama-8b", "engines-only/x.gguf", "1000")
	require.NoError(t, err, "root may: %s", out)
	assert.Equal(t, `s "engines-only/x.gguf"`, getProp(t, "llama-8b", "Model"))

	stage := filepath.Join(dir, "state", "staged")
	assert.Equal(t, "710 root pool-engine", sh(t, "stat", "-c", "%a %U %G", stage))
	staged, _ = filepath.Glob(filepath.Join(stage, "*", "x.gguf"))
	require.Len(t, staged, 1)
	out, err = try("setpriv", "--reuid=operator2", "--regid=operator2", "--init-groups", "cat", staged[0])
	assert.Error(t, err, "the admin reads no staged model: %s", out)
	assert.Contains(t, out, "Permission denied")
}
