package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	ifaces "github.com/llorch/pool-managerd/dbus"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
)

// list prints one row per pool with its state, leases of slots, model,
// GPUs and the engine's uptime, uncoloured on a pipe; --json has every
// property.
func TestListShowsEveryPoolAsATableAndAsJSON(t *testing.T) {
	daemon(t)
	r := poolctl(t, "", "list")
	require.Equal(t, 0, r.code, r.stderr)
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	require.Len(t, lines, 5, r.stdout) // header, two pools, blank, legend
	assert.Regexp(t, `^POOL +STATE +READY +LEASES +MODEL +GPUS +CRASHES +RESTARTS +BREAKER +UPTIME$`, lines[0])
	assert.Regexp(t, `^llama-8b +ready +yes +0/2 +a\.gguf +0 +0 +0 +closed +[0-9]+(ms|s)( [0-9]+ms)?$`, lines[1])
	assert.Regexp(t, `^qwen +ready +yes +0/- +b\.gguf +1 +0 +0 +closed +[0-9]+(ms|s)`, lines[2])
	assert.Equal(t, "2 pools listed.", lines[4])
	assert.NotContains(t, r.stdout, "\x1b[", "no colour on a pipe")
	t.Logf("poolctl list:\n%s", r.stdout)

	r = poolctl(t, "", "list", "--json")
	require.Equal(t, 0, r.code, r.stderr)
	var pools []map[string]any
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &pools), r.stdout)
	require.Len(t, pools, 2)
	for _, p := range pools {
		assert.Len(t, p, len(propertyNames()), "every property of %v", p["Id"])
	}
	assert.Equal(t, "llama-8b", pools[0]["Id"])
	assert.Equal(t, "ready", pools[0]["State"])
	assert.Equal(t, true, pools[0]["Ready"])
	assert.EqualValues(t, 2, pools[0]["Slots"])
	assert.Equal(t, "0", pools[0]["DeviceMask"])
	assert.Regexp(t, `^sha256:[0-9a-f]{64}$`, pools[0]["ModelDigest"])
	assert.Equal(t, "qwen", pools[1]["Id"])
	assert.Equal(t, "1", pools[1]["DeviceMask"])
}

// On a terminal the state is coloured as systemctl colours an active unit.
func TestListColoursTheStateOnATerminal(t *testing.T) {
	daemon(t)
	out, code := inTerminal(t, "list")
	require.Equal(t, 0, code, out)
	assert.Contains(t, out, "\x1b[0;1;32mready\x1b[0m")
}

// status shows every property readably and the last journal lines of the
// daemon about the pool and of the pool's scope.
func TestStatusShowsPropertiesAndJournals(t *testing.T) {
	daemon(t)
	// Any user may log a POOL_ID=; status shows only the daemon's own.
	const forged = "forged by a user: the pool was hacked"
	logger := exec.Command("setpriv", "--reuid="+viewer, "--regid="+viewer, "--init-groups", "logger", "--journald")
	logger.Stdin = strings.NewReader("MESSAGE=" + forged + "\nPOOL_ID=llama-8b\n")
	out, err := logger.CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.Eventually(t, func() bool {
		out, _ := exec.Command("journalctl", "-o", "cat", "POOL_ID=llama-8b").Output()
		return strings.Contains(string(out), forged)
	}, 10*time.Second, 100*time.Millisecond, "the forged entry is in the journal")
	var r result
	require.Eventually(t, func() bool {
		r = poolctl(t, "", "status", "llama-8b")
		return r.code == 0 && strings.Contains(r.stdout, "engine ready") && strings.Contains(r.stdout, "server is listening")
	}, 20*time.Second, 200*time.Millisecond, "status shows both journals:\n%s%s", r.stdout, r.stderr)
	assert.True(t, strings.HasPrefix(r.stdout, "● llama-8b - ready\n"), r.stdout)
	for _, want := range []string{
		"Id: llama-8b", "State: ready", "Ready: yes", "Slots: 2", "Operation: ", "Progress: -", "NextRestartUSec: -",
		`Unit: pool-engine-llama\\x2d8b\.scope`, "CrashCount: 0", "BreakerState: closed",
	} {
		assert.Regexp(t, `(?m)^ *`+want+`$`, r.stdout)
	}
	assert.Contains(t, r.stdout, "\nJournal of pool-managerd about llama-8b:\n")
	assert.Contains(t, r.stdout, "\nJournal of pool-engine-llama\\x2d8b.scope:\n")
	assert.NotContains(t, r.stdout, forged)
	assert.Regexp(t, `(?m)^ +Uptime: [0-9]+`, r.stdout)
	t.Logf("poolctl status llama-8b:\n%s", r.stdout)
	assert.Regexp(t, `(?m)^ +ModelDigest: sha256:[0-9a-f]{64}$`, r.stdout)

	r = poolctl(t, "", "status", "qwen", "--json")
	require.Equal(t, 0, r.code, r.stderr)
	var p map[string]any
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &p), r.stdout)
	assert.Equal(t, "qwen", p["Id"])
	assert.Equal(t, "b.gguf", p["Model"])
	assert.Contains(t, p, "Progress")
}

// A drain ends with its outcome and duration: drained when no lease is
// held, forced at the deadline when one stays; a reload ends with the
// model it loaded, and off a terminal says each step on a line of its own.
func TestDrainAndReloadPrintTheirOutcome(t *testing.T) {
	dir := daemon(t)

	r := poolctl(t, "", "drain", "qwen", "--deadline", "5s")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Regexp(t, `(?m)^drain qwen: drained in [0-9.]+m?s$`, r.stdout)
	assert.Equal(t, `s "stopped"`, prop("qwen", "State"))
	// start waits for the engine to serve, as systemctl start waits.
	r = poolctl(t, "", "start", "qwen")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Regexp(t, `(?m)^start qwen: ready in [0-9.]+m?s\n\z`, r.stdout)
	assert.Equal(t, "b true", prop("qwen", "Ready"), "Ready when start returns")

	router, err := dbus.ConnectSystemBus()
	require.NoError(t, err)
	defer router.Close()
	var lease string
	require.NoError(t, router.Object(busName, managerPath).Call(managerIface+".AcquireLease", 0, "qwen").Store(&lease))
	r = poolctl(t, "", "drain", "--deadline=1s", "qwen")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Regexp(t, `(?m)^drain qwen: forced in 1(\.[0-9])?s$`, r.stdout)
	assert.Contains(t, r.stdout, "drain qwen: draining\n", "the step, on a line of its own")

	bigModel(t, dir, "big.gguf")
	r = poolctl(t, "", "reload", "llama-8b", "big.gguf", "--deadline", "10s")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stdout, "reload llama-8b: staging\n", r.stdout)
	assert.Contains(t, r.stdout, "reload llama-8b: starting\n", r.stdout)
	assert.Regexp(t, `(?m)^reload llama-8b: reloaded big\.gguf in [0-9.]+m?s\n\z`, r.stdout)
	assert.NotContains(t, r.stdout, "\r", "no progress line off a terminal")
	assert.Equal(t, `s "big.gguf"`, prop("llama-8b", "Model"))
	t.Logf("poolctl reload llama-8b big.gguf | cat:\n%s", r.stdout)
}

// A start whose engine cannot come up fails with the pool's LastError;
// --no-block returns before the engine is up.
func TestStartWaitsAndSaysWhyItFailed(t *testing.T) {
	dir := daemon(t)
	r := poolctl(t, "", "stop", "qwen")
	require.Equal(t, 0, r.code, r.stderr)
	// The simulator refuses a file that is no GGUF model and exits.
	require.NoError(t, os.WriteFile(filepath.Join(dir, "models", "b.gguf"), []byte("PK\x03\x04 not a model"), 0o644))
	r = poolctl(t, "", "start", "qwen")
	assert.Equal(t, 1, r.code, r.stdout)
	assert.Regexp(t, `(?m)^start qwen: failed after [0-9.]+m?s$`, r.stdout)
	assert.Regexp(t, `^poolctl: the engine did not come up: pool qwen is (backoff|failed): .+`, r.stderr)
	t.Logf("poolctl start qwen on a file that is no model: %s%s", r.stdout, r.stderr)

	r = poolctl(t, "", "stop", "llama-8b")
	require.Equal(t, 0, r.code, r.stderr)
	r = poolctl(t, "", "start", "llama-8b", "--no-block")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Empty(t, r.stdout)
	waitProp(t, "llama-8b", "Ready", "b true")
}

// A start waiting for its engine ends, with the reason, when the daemon
// leaves the bus: it does not wait forever for a change nobody will send.
func TestStartEndsWhenTheDaemonLeaves(t *testing.T) {
	dir := daemon(t)
	r := poolctl(t, "", "stop", "qwen")
	require.Equal(t, 0, r.code, r.stderr)
	// The simulator loads this model for a minute.
	require.NoError(t, os.WriteFile(filepath.Join(dir, "models", "b.gguf"), []byte("GGUF\x03\x00\x00\x00\nsim-load-time=60s\n"), 0o644))
	got := make(chan result, 1)
	go func() { got <- poolctl(t, "", "start", "qwen") }()
	waitProp(t, "qwen", "State", `s "starting"`)
	// A second start of a starting pool succeeds and leaves it starting.
	r = poolctl(t, "", "start", "qwen", "--no-block")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Equal(t, `s "starting"`, prop("qwen", "State"))
	out, err := exec.Command("systemctl", "stop", "pool-managerd.service").CombinedOutput()
	require.NoError(t, err, "%s", out)
	select {
	case r = <-got:
	case <-time.After(30 * time.Second):
		t.Fatal("poolctl start still waits after the daemon left")
	}
	assert.Equal(t, 1, r.code, r.stdout)
	assert.Contains(t, r.stderr, "poolctl: pool-managerd left the bus during the start of qwen (poolctl status qwen)")
}

// On a terminal a reload rewrites one line with its step and progress,
// then leaves the outcome on a clean line.
func TestReloadShowsALiveProgressLineOnATerminal(t *testing.T) {
	dir := daemon(t)
	bigModel(t, dir, "big.gguf")
	out, code := inTerminal(t, "reload", "llama-8b", "big.gguf")
	require.Equal(t, 0, code, out)
	assert.Contains(t, out, "\r\x1b[Kreload llama-8b: waiting (0s)")
	assert.Regexp(t, `\r\x1b\[Kreload llama-8b: staging [0-9]+% \([0-9]+s\)`, out)
	assert.Regexp(t, `\r\x1b\[Kreload llama-8b: reloaded big\.gguf in [0-9.]+m?s\r?\n$`, out)
	assert.NotContains(t, out, "reload llama-8b: staging\r\n", "no plain step lines on a terminal")
	t.Logf("the terminal saw %q", out)
}

// events prints a line per change of any pool until interrupted; --json
// prints the same as JSON lines.
func TestEventsFollowEveryPool(t *testing.T) {
	daemon(t)
	for _, format := range []string{"text", "json"} {
		t.Run(format, func(t *testing.T) {
			args := []string{"events"}
			if format == "json" {
				args = append(args, "--json")
			}
			cmd, lines, _ := background(t, args...)

			// A lease taken and given back is a change of each pool;
			// repeated until poolctl, subscribed, shows one.
			router, err := dbus.ConnectSystemBus()
			require.NoError(t, err)
			defer router.Close()
			stopLeases := make(chan struct{})
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					var lease string
					if router.Object(busName, managerPath).Call(managerIface+".AcquireLease", 0, "llama-8b").Store(&lease) == nil {
						router.Object(busName, managerPath).Call(managerIface+".ReleaseLease", 0, lease)
					}
					select {
					case <-stopLeases:
						return
					case <-time.After(200 * time.Millisecond):
					}
				}
			}()
			llama := `^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\S* llama-8b ActiveLeases=1$`
			qwen := `^\d{4}-\d\d-\d\dT\S+ qwen .*State=stopped`
			if format == "json" {
				llama = `^\{"time":"[^"]+","pool":"llama-8b","changed":\{"ActiveLeases":1\}\}$`
				qwen = `^\{"time":"[^"]+","pool":"qwen","changed":\{.*"State":"stopped"`
			}
			waitLine(t, lines, llama)
			close(stopLeases)
			wg.Wait()

			// Anyone may send a PropertiesChanged, also to poolctl alone;
			// only the daemon's are shown.
			forge(t, router, cmd.Process.Pid, ifaces.PoolPath("qwen"))
			r := poolctl(t, "", "stop", "qwen")
			require.Equal(t, 0, r.code, r.stderr)
			skipped := waitLine(t, lines, qwen)
			assert.NotContains(t, strings.Join(skipped, "\n"), "forged")
			r = poolctl(t, "", "start", "qwen")
			require.Equal(t, 0, r.code, r.stderr)
			waitProp(t, "qwen", "Ready", "b true")

			// A restarted daemon is followed under its new bus name.
			left, back := ` - pool-managerd left the bus$`, ` - pool-managerd is on the bus as :1\.[0-9]+$`
			if format == "json" {
				left, back = `^\{"time":"[^"]+","daemon":""\}$`, `^\{"time":"[^"]+","daemon":":1\.[0-9]+"\}$`
			}
			out, err := exec.Command("systemctl", "restart", "pool-managerd.service").CombinedOutput()
			require.NoError(t, err, "%s", out)
			waitLine(t, lines, left)
			waitLine(t, lines, back)
			waitProp(t, "qwen", "Ready", "b true")
			r = poolctl(t, "", "stop", "qwen")
			require.Equal(t, 0, r.code, r.stderr)
			waitLine(t, lines, qwen)
			r = poolctl(t, "", "start", "qwen")
			require.Equal(t, 0, r.code, r.stderr)
			waitProp(t, "qwen", "Ready", "b true")

			require.NoError(t, cmd.Process.Signal(syscall.SIGINT))
			for range lines {
			}
			assert.NoError(t, cmd.Wait(), "events ends well when interrupted")
		})
	}
}

// background starts poolctl and reads its stdout line by line; it is
// killed when the test ends, if it has not ended before.
func background(t *testing.T, args ...string) (*exec.Cmd, <-chan string, *strings.Builder) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	cmd := exec.CommandContext(ctx, os.Getenv(sandbox.BinEnv("poolctl")), args...)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	stderr := &strings.Builder{}
	cmd.Stderr = stderr
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { cancel(); cmd.Wait() })
	lines := make(chan string, 256)
	go func() {
		s := bufio.NewScanner(stdout)
		for s.Scan() {
			lines <- s.Text()
		}
		close(lines)
	}()
	return cmd, lines, stderr
}

// waitLine waits for a line matching pattern and returns the lines before
// it.
func waitLine(t *testing.T, lines <-chan string, pattern string) []string {
	t.Helper()
	re := regexp.MustCompile(pattern)
	var seen []string
	deadline := time.After(30 * time.Second)
	for {
		select {
		case l, ok := <-lines:
			require.True(t, ok, "poolctl events ended; it printed:\n%s", strings.Join(seen, "\n"))
			if re.MatchString(l) {
				t.Logf("poolctl events: %s", l)
				return seen
			}
			seen = append(seen, l)
		case <-deadline:
			require.FailNow(t, "no line matching "+pattern, "poolctl events printed:\n%s", strings.Join(seen, "\n"))
			return nil
		}
	}
}

// Failures exit 1 with the D-Bus error name on stderr; mistakes on the
// command line exit 2 and call nothing.
func TestFailuresNameTheErrorAndUsageExits2(t *testing.T) {
	daemon(t)
	for _, c := range []struct {
		args []string
		code int
		err  string
		out  string
	}{
		{[]string{"drain", "nope"}, 4, "poolctl: org.llorch.PoolManager1.Error.NoSuchPool: ", "drain nope: failed after 0s\n"},
		{[]string{"stop", "nope"}, 4, "poolctl: org.llorch.PoolManager1.Error.NoSuchPool: ", "stop nope: failed after 0s\n"},
		{[]string{"status", "nope"}, 4, "poolctl: org.llorch.PoolManager1.Error.NoSuchPool: ", ""},
		{[]string{"reload", "llama-8b", "../../etc/passwd"}, 1, "poolctl: org.llorch.PoolManager1.Error.InvalidArgument: ", "reload llama-8b: failed after 0s\n"},
		{[]string{"drain", "llama-8b", "--deadline", "48h"}, 1, "poolctl: org.llorch.PoolManager1.Error.InvalidArgument: ", "drain llama-8b: failed after 0s\n"},
		{[]string{"reset-breaker", "nope"}, 4, "poolctl: org.llorch.PoolManager1.Error.NoSuchPool: ", ""},
		{[]string{"--bus", "unix:path=/nonexistent", "list"}, 1, "poolctl: cannot connect to unix:path=/nonexistent", ""},
		{nil, 2, "poolctl: no command given\nTry 'poolctl --help'.\n", ""},
		{[]string{"frobnicate"}, 2, `poolctl: unknown command "frobnicate"`, ""},
		{[]string{"drain"}, 2, "poolctl: drain takes POOL, got 0 argument(s)\nTry 'poolctl drain --help'.\n", ""},
		{[]string{"stop", "llama-8b", "qwen"}, 2, "poolctl: stop takes POOL, got 2 argument(s)", ""},
		{[]string{"drain", "llama-8b", "--deadline", "soon"}, 2, "poolctl: --deadline: time span \"soon\": expected a number at \"soon\"\nTry 'poolctl drain --help'.\n", ""},
		{[]string{"drain", "llama-8b", "--deadline", "-1s"}, 2, `poolctl: --deadline: time span "-1s" is negative`, ""},
		{[]string{"list", "--frob"}, 2, "poolctl: unknown option --frob\nTry 'poolctl list --help'.\n", ""},
		{[]string{"start", "--deadline", "5", "qwen"}, 2, "poolctl: start takes no option --deadline\n", ""},
	} {
		r := poolctl(t, "", c.args...)
		assert.Equal(t, c.code, r.code, "%v: %s", c.args, r.stderr)
		assert.Contains(t, r.stderr, c.err, "%v", c.args)
		assert.Equal(t, c.out, r.stdout, "%v", c.args)
	}
	r := poolctl(t, "", "allow-restart", "llama-8b")
	assert.Equal(t, 1, r.code)
	assert.Regexp(t, `^poolctl: org\.\S+: no restart is pending`, r.stderr)
	assert.Equal(t, `s "ready"`, prop("llama-8b", "State"), "nothing changed")
	assert.Equal(t, `s "a.gguf"`, prop("llama-8b", "Model"))
}

// --help explains poolctl and each command on stdout and exits 0.
func TestHelpForPoolctlAndEachCommand(t *testing.T) {
	r := poolctl(t, "", "--help")
	require.Equal(t, 0, r.code, r.stderr)
	for _, c := range commands {
		if c.hidden {
			assert.NotContains(t, r.stdout, c.name)
			continue
		}
		assert.Regexp(t, `(?m)^  `+regexp.QuoteMeta(strings.TrimSpace(c.name+" "+c.args))+` +\S`, r.stdout)
		h := poolctl(t, "", c.name, "--help")
		assert.Equal(t, 0, h.code, c.name)
		assert.Contains(t, h.stdout, "Usage: poolctl "+c.name, c.name)
		assert.Empty(t, h.stderr, c.name)
	}
	assert.Contains(t, poolctl(t, "", "drain", "--help").stdout, "--deadline SPAN")
	assert.Contains(t, poolctl(t, "", "list", "-h").stdout, "--json")
	assert.Equal(t, r.stdout, poolctl(t, "", "help").stdout)
	assert.Equal(t, poolctl(t, "", "reload", "--help").stdout, poolctl(t, "", "help", "reload").stdout)
}

// A user outside the admin group reads everything poolctl shows but
// changes nothing: the refusal names AccessDenied and says who may.
func TestAUserWhoIsNoAdminReadsButCannotChange(t *testing.T) {
	daemon(t)
	r := poolctl(t, viewer, "list")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Regexp(t, `(?m)^llama-8b +ready +yes `, r.stdout)
	r = poolctl(t, viewer, "status", "llama-8b", "--json")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stdout, `"State": "ready"`)
	r = poolctl(t, viewer, "status", "llama-8b")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stdout, "Journal of pool-managerd about llama-8b:")

	for _, args := range [][]string{{"stop", "llama-8b"}, {"drain", "llama-8b"}, {"reload", "llama-8b", "b.gguf"}, {"reset-breaker", "llama-8b"}} {
		r = poolctl(t, viewer, args...)
		assert.Equal(t, 1, r.code, "%v", args)
		assert.Contains(t, r.stderr, "poolctl: org.freedesktop.DBus.Error.AccessDenied: ", "%v", args)
		assert.Contains(t, r.stderr, "changing pools is for root and the pool-managerd admin group", "%v", args)
		t.Logf("poolctl %s as %s: %s", strings.Join(args, " "), viewer, r.stderr)
	}
	assert.Equal(t, `s "ready"`, prop("llama-8b", "State"))
	assert.Equal(t, `s "a.gguf"`, prop("llama-8b", "Model"))
}

// The bash completion offers poolctl's commands, each command's options
// and the daemon's pool ids.
func TestBashCompletionOffersCommandsOptionsAndPools(t *testing.T) {
	dir := daemon(t)
	// The completion reads the daemon's configuration where the packages
	// put it.
	extra := filepath.Join(dir, "extra")
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "models", "sub"), 0o755))
	require.NoError(t, os.MkdirAll(extra, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "models", "sub", "c.gguf"), nil, 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(extra, "x.gguf"), nil, 0o644))
	require.NoError(t, os.MkdirAll("/etc/pool-managerd", 0o755))
	t.Cleanup(func() { os.RemoveAll("/etc/pool-managerd") })
	require.NoError(t, os.WriteFile("/etc/pool-managerd/pool-managerd.conf", fmt.Appendf(nil, "[Manager]\nModelsDir=%s/models\nModelDirs=%s\n", dir, extra), 0o644))
	completion, err := os.ReadFile("../../packaging/completion/poolctl.bash")
	require.NoError(t, err)
	complete := func(words ...string) string {
		script := string(completion) + `
COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _poolctl; echo "${COMPREPLY[*]}"`
		cmd := exec.Command("bash", append([]string{"-c", script, "poolctl"}, words...)...)
		cmd.Dir = "/"
		cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(os.Getenv(sandbox.BinEnv("poolctl")))+":"+os.Getenv("PATH"))
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "%s", out)
		return strings.TrimSpace(string(out))
	}
	for _, c := range []struct {
		words []string
		want  string
	}{
		{[]string{"poolctl", ""}, "list status show logs events start ensure-ready stop restart drain reload enable disable is-ready wait reset-breaker allow-restart daemon-reload help"},
		{[]string{"poolctl", "re"}, "restart reload reset-breaker"},
		{[]string{"poolctl", "--json", "st"}, "status start stop"},
		{[]string{"poolctl", "wait", "--for", "s"}, "stopped starting sleeping"},
		{[]string{"poolctl", "show", "qwen", "-p", "Dr"}, "Draining"},
		{[]string{"poolctl", "is-ready", "q"}, "qwen"},
		{[]string{"poolctl", "ensure-ready", "l"}, "llama-8b"},
		{[]string{"poolctl", "ensure-ready", "qwen", "--t"}, "--timeout"},
		{[]string{"poolctl", "e"}, "events ensure-ready enable"},
		{[]string{"poolctl", "drain", ""}, "llama-8b qwen"},
		{[]string{"poolctl", "--bus", "unix:path=/run/dbus/system_bus_socket", "status", "q"}, "qwen"},
		{[]string{"poolctl", "reload", "l"}, "llama-8b"},
		{[]string{"poolctl", "drain", "qwen", ""}, ""},
		{[]string{"poolctl", "drain", "qwen", "--"}, "--bus --host --json --help --deadline"},
		{[]string{"poolctl", "stop", "--"}, "--bus --host --json --help --deadline --now"},
		{[]string{"poolctl", "reload", "qwen", "--r"}, "--runtime"},
		{[]string{"poolctl", "list", "--j"}, "--json"},
		{[]string{"poolctl", "drain", "qwen", "--deadline", "3"}, "30s"},
		// Models only from the daemon's model directories, relative to
		// ModelsDir or absolute beneath ModelDirs=; never from the
		// current directory (/ here).
		{[]string{"poolctl", "reload", "qwen", ""}, "a.gguf b.gguf sub/"},
		{[]string{"poolctl", "reload", "qwen", "sub/"}, "sub/c.gguf"},
		{[]string{"poolctl", "reload", "qwen", "e"}, ""},
		{[]string{"poolctl", "reload", "qwen", extra + "/"}, extra + "/x.gguf"},
		{[]string{"poolctl", "reload", "qwen", "/e"}, ""},
		{[]string{"poolctl", "reload", "qwen", "x.gguf", ""}, ""},
	} {
		assert.Equal(t, c.want, complete(c.words...), "%q", c.words)
	}
}

// Ctrl-C leaves poolctl, not the reload: it says so, exits 130, and the
// daemon finishes the reload.
func TestAnInterruptedReloadGoesOnInTheDaemon(t *testing.T) {
	dir := daemon(t)
	bigModel(t, dir, "big.gguf")
	cmd, lines, stderr := background(t, "reload", "llama-8b", "big.gguf")
	waitLine(t, lines, `^reload llama-8b: staging$`)
	require.NoError(t, cmd.Process.Signal(syscall.SIGINT))
	for range lines {
	}
	err := cmd.Wait()
	var ee *exec.ExitError
	require.ErrorAs(t, err, &ee)
	assert.Equal(t, 130, ee.ExitCode())
	assert.Equal(t, "poolctl: interrupted: the reload of llama-8b goes on in pool-managerd (poolctl status llama-8b)\n", stderr.String())
	waitProp(t, "llama-8b", "Model", `s "big.gguf"`)
	waitProp(t, "llama-8b", "Ready", "b true")
}

// forge sends a PropertiesChanged saying State=forged to everyone and to
// the bus connection of process pid alone.
func forge(t *testing.T, conn *dbus.Conn, pid int, path dbus.ObjectPath) {
	t.Helper()
	changed := map[string]dbus.Variant{"State": dbus.MakeVariant("forged")}
	require.NoError(t, conn.Emit(path, propsChanged, poolIface, changed, []string{}))
	var names []string
	require.NoError(t, conn.BusObject().Call(busDriver+".ListNames", 0).Store(&names))
	sent := false
	for _, n := range names {
		var p uint32
		if !strings.HasPrefix(n, ":") || conn.BusObject().Call(busDriver+".GetConnectionUnixProcessID", 0, n).Store(&p) != nil || int(p) != pid {
			continue
		}
		body := []any{poolIface, changed, []string{}}
		msg := &dbus.Message{Type: dbus.TypeSignal, Headers: map[dbus.HeaderField]dbus.Variant{
			dbus.FieldPath:        dbus.MakeVariant(path),
			dbus.FieldInterface:   dbus.MakeVariant("org.freedesktop.DBus.Properties"),
			dbus.FieldMember:      dbus.MakeVariant("PropertiesChanged"),
			dbus.FieldDestination: dbus.MakeVariant(n),
			dbus.FieldSignature:   dbus.MakeVariant(dbus.SignatureOf(body...)),
		}, Body: body}
		require.NoError(t, conn.Send(msg, nil).Err)
		sent = true
	}
	require.True(t, sent, "poolctl events (pid %d) is on the bus", pid)
}
