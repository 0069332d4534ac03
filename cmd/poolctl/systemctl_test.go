package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	ifaces "github.com/llorch/pool-managerd/dbus"
)

// --json is one indented format for list, status and show, given before
// or after the command; show prints NAME=VALUE; an unknown pool exits 4.
func TestOneJSONFormatShowAndExitStatuses(t *testing.T) {
	daemon(t)
	before := poolctl(t, "", "--json", "list")
	require.Equal(t, 0, before.code, before.stderr)
	after := poolctl(t, "", "list", "--json")
	require.Equal(t, 0, after.code, after.stderr)
	assert.Equal(t, before.stdout, after.stdout)
	assert.True(t, strings.HasPrefix(before.stdout, "[\n  {\n    \"Id\": \"llama-8b\",\n    \"State\": \"ready\",\n"), before.stdout)

	status := poolctl(t, "", "status", "--json", "llama-8b")
	require.Equal(t, 0, status.code, status.stderr)
	assert.True(t, strings.HasPrefix(status.stdout, "{\n  \"Id\": \"llama-8b\",\n  \"State\": \"ready\",\n"), status.stdout)
	var fromList []map[string]any
	var fromStatus map[string]any
	require.NoError(t, json.Unmarshal([]byte(before.stdout), &fromList))
	require.NoError(t, json.Unmarshal([]byte(status.stdout), &fromStatus))
	assert.Equal(t, fromList[0], fromStatus, "one format")

	r := poolctl(t, "", "show", "llama-8b", "-p", "State,Ready", "--json")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Equal(t, "{\n  \"State\": \"ready\",\n  \"Ready\": true\n}\n", r.stdout)
	r = poolctl(t, "", "show", "-p", "State", "llama-8b", "--property", "Ready,Slots")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Equal(t, "State=ready\nReady=yes\nSlots=2\n", r.stdout)
	r = poolctl(t, "", "show", "llama-8b", "--value", "-p", "Model")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Equal(t, "a.gguf\n", r.stdout)
	r = poolctl(t, "", "show", "qwen")
	require.Equal(t, 0, r.code, r.stderr)
	lines := strings.Split(strings.TrimSuffix(r.stdout, "\n"), "\n")
	assert.Len(t, lines, len(propertyNames()))
	assert.Contains(t, lines, "Id=qwen")
	assert.Contains(t, lines, "DeviceMask=1")
	assert.Contains(t, lines, "Operation=")
	assert.Contains(t, lines, "MainPID="+strings.TrimPrefix(prop("qwen", "MainPID"), "u "))

	r = poolctl(t, "", "show", "llama-8b", "-p", "State,Nope")
	assert.Equal(t, 1, r.code)
	assert.Equal(t, "poolctl: pool llama-8b has no property \"Nope\" (poolctl show llama-8b lists them)\n", r.stderr)
	assert.Empty(t, r.stdout)
	for _, args := range [][]string{{"show", "nope"}, {"status", "nope"}, {"logs", "nope"}, {"stop", "nope"}, {"start", "nope"}, {"is-ready", "nope"}, {"wait", "nope"}, {"reset-breaker", "nope"}} {
		r = poolctl(t, "", args...)
		assert.Equal(t, 4, r.code, "%v: %s", args, r.stderr)
		assert.Contains(t, r.stderr, "poolctl: org.llorch.PoolManager1.Error.NoSuchPool: ", "%v", args)
	}

	r = poolctl(t, "", "--json", "drain", "qwen", "--deadline", "5")
	require.Equal(t, 0, r.code, r.stderr)
	var outcome map[string]any
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &outcome), r.stdout)
	assert.Equal(t, "drained", outcome["outcome"])
	assert.Equal(t, "qwen", outcome["pool"])
	assert.Contains(t, r.stdout, "{\n  \"command\": \"drain\",")
}

// stop drains first: the engine serves the leases in flight until they
// are released or the deadline passes; --now revokes them at once. A
// start of a ready pool leaves its engine alone; restart replaces it.
func TestStopIsGracefulAndStartOfAReadyPoolChangesNothing(t *testing.T) {
	daemon(t)
	pid := prop("llama-8b", "MainPID")
	r := poolctl(t, "", "start", "llama-8b")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Regexp(t, `^start llama-8b: ready in [0-9.]+m?s\n\z`, r.stdout)
	r = poolctl(t, "", "start", "--no-block", "llama-8b")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Equal(t, pid, prop("llama-8b", "MainPID"), "the engine was left alone")
	assert.Equal(t, `s "ready"`, prop("llama-8b", "State"))

	router, err := dbus.ConnectSystemBus()
	require.NoError(t, err)
	defer router.Close()
	var lease string
	require.NoError(t, router.Object(busName, managerPath).Call(managerIface+".AcquireLease", 0, "qwen").Store(&lease))
	cmd, lines, _ := background(t, "stop", "qwen", "--deadline", "1min")
	waitLine(t, lines, `^stop qwen: draining$`)
	waitProp(t, "qwen", "Draining", "b true")
	assert.Equal(t, "b true", prop("qwen", "Live"), "the engine serves the lease in flight")
	assert.Equal(t, "u 1", prop("qwen", "ActiveLeases"))
	require.NoError(t, router.Object(busName, managerPath).Call(managerIface+".ReleaseLease", 0, lease).Err)
	waitLine(t, lines, `^stop qwen: drained in [0-9.]+m?s$`)
	for range lines {
	}
	require.NoError(t, cmd.Wait())
	assert.Equal(t, `s "stopped"`, prop("qwen", "State"))

	r = poolctl(t, "", "start", "qwen")
	require.Equal(t, 0, r.code, r.stderr)
	require.NoError(t, router.Object(busName, managerPath).Call(managerIface+".AcquireLease", 0, "qwen").Store(&lease))
	begin := time.Now()
	r = poolctl(t, "", "stop", "qwen", "--now")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Less(t, time.Since(begin), 10*time.Second, "no wait for the lease")
	assert.Regexp(t, `(?m)^stop qwen: stopped in [0-9.]+m?s$`, r.stdout)
	assert.Equal(t, `s "stopped"`, prop("qwen", "State"))
	assert.Equal(t, ifaces.ErrNoSuchLease, errorName(router.Object(busName, managerPath).Call(managerIface+".ReleaseLease", 0, lease).Err), "revoked")

	r = poolctl(t, "", "restart", "llama-8b", "--deadline", "5s")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Regexp(t, `^(restart llama-8b: [a-z]+\n)*restart llama-8b: drained in [0-9.]+m?s\n(restart llama-8b: [a-z]+\n)*restart llama-8b: ready in [0-9.]+m?s\n\z`, r.stdout)
	assert.NotEqual(t, pid, prop("llama-8b", "MainPID"), "a new engine")
	assert.Equal(t, "b true", prop("llama-8b", "Ready"))
}

// is-ready answers with its exit status alone; wait returns once the pool
// is in the state asked for, or fails at its timeout.
func TestIsReadyAndWait(t *testing.T) {
	daemon(t)
	r := poolctl(t, "", "is-ready", "llama-8b")
	assert.Equal(t, result{"", "", 0}, r)
	r = poolctl(t, "", "stop", "--now", "qwen")
	require.Equal(t, 0, r.code, r.stderr)
	r = poolctl(t, "", "is-ready", "qwen")
	assert.Equal(t, result{"", "", 1}, r)

	r = poolctl(t, "", "wait", "qwen", "--for", "stopped")
	assert.Equal(t, result{"", "", 0}, r, "there already")
	r = poolctl(t, "", "wait", "qwen", "--timeout", "1")
	assert.Equal(t, 1, r.code)
	assert.Equal(t, "poolctl: pool qwen is stopped, not ready, after 1s\n", r.stderr)

	cmd, _, stderr := background(t, "wait", "qwen")
	r = poolctl(t, "", "start", "qwen", "--no-block")
	require.Equal(t, 0, r.code, r.stderr)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		require.NoError(t, err, stderr.String())
	case <-time.After(60 * time.Second):
		t.Fatal("wait did not return when the pool became ready")
	}
	assert.Equal(t, "b true", prop("qwen", "Ready"))
}

// logs prints the daemon's own entries about the pool and its engine's,
// escaped; -n bounds them and -f follows until interrupted. events begins
// with every pool's state.
func TestLogsAndEventsStartWithTheState(t *testing.T) {
	daemon(t)
	const forged = "forged by a user about llama-8b"
	logger := exec.Command("setpriv", "--reuid="+viewer, "--regid="+viewer, "--init-groups", "logger", "--journald")
	logger.Stdin = strings.NewReader("MESSAGE=" + forged + "\nPOOL_ID=llama-8b\n")
	out, err := logger.CombinedOutput()
	require.NoError(t, err, "%s", out)
	var r result
	require.Eventually(t, func() bool {
		r = poolctl(t, "", "logs", "llama-8b")
		return r.code == 0 && strings.Contains(r.stdout, "engine ready") && strings.Contains(r.stdout, "server is listening")
	}, 20*time.Second, 200*time.Millisecond, "logs shows the daemon's and the engine's lines:\n%s%s", r.stdout, r.stderr)
	assert.NotContains(t, r.stdout, forged)
	assert.NotContains(t, r.stdout, "qwen")
	r = poolctl(t, "", "logs", "llama-8b", "-n", "2")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Len(t, strings.Split(strings.TrimSuffix(r.stdout, "\n"), "\n"), 2, r.stdout)

	cmd, lines, _ := background(t, "logs", "qwen", "-f", "-n", "0")
	time.Sleep(500 * time.Millisecond) // journalctl -f reads from here on
	r = poolctl(t, "", "stop", "qwen", "--now")
	require.Equal(t, 0, r.code, r.stderr)
	waitLine(t, lines, ` pool-managerd\[[0-9]+\]: drain drained$`)
	require.NoError(t, cmd.Process.Signal(syscall.SIGINT))
	for range lines {
	}
	assert.NoError(t, cmd.Wait(), "logs -f ends well when interrupted")

	for _, format := range []string{"text", "json"} {
		args := []string{"events"}
		llama := `^\d{4}-\d\d-\d\dT\S+ llama-8b State=ready Ready=true ActiveLeases=0 Model=a\.gguf BreakerState=closed Operation="" LastError="(GPU check incomplete: [^"]*)?"$`
		qwen := `^\d{4}-\d\d-\d\dT\S+ qwen State=stopped Ready=false `
		if format == "json" {
			args = append(args, "--json")
			llama = `^\{"time":"[^"]+","pool":"llama-8b","state":\{"Id":"llama-8b","State":"ready",.*"Progress":`
			qwen = `^\{"time":"[^"]+","pool":"qwen","state":\{"Id":"qwen","State":"stopped",`
		}
		cmd, lines, _ := background(t, args...)
		assert.Empty(t, waitLine(t, lines, llama), "the state first")
		assert.Empty(t, waitLine(t, lines, qwen))
		require.NoError(t, cmd.Process.Signal(syscall.SIGINT))
		for range lines {
		}
		assert.NoError(t, cmd.Wait())
	}
}

// -H reaches a host as systemctl -H does, through ssh and the host's
// systemd-stdio-bridge; several hosts make one table with a HOST column.
// Here ssh is a stand-in that runs the remote command line locally: the
// bridge and the bus are real.
func TestHostsOverSSHAndTheStdioBridge(t *testing.T) {
	daemon(t)
	bin := t.TempDir()
	log := filepath.Join(bin, "ssh.log")
	require.NoError(t, os.WriteFile(filepath.Join(bin, "ssh"), fmt.Appendf(nil, `#!/bin/sh
echo "$*" >> %s
while [ $# -gt 0 ]; do
	case $1 in
	--) host=$2; shift 2; break ;;
	-p) shift 2 ;;
	*) shift ;;
	esac
done
case $host in
*unknown*) echo "ssh: Could not resolve hostname $host: Name or service not known" >&2; exit 255 ;;
esac
exec sh -c "$*"
`, log), 0o755))
	t.Setenv("PATH", bin+":"+os.Getenv("PATH"))

	r := poolctl(t, "", "-H", "root@gpu1", "list")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Regexp(t, `^POOL +STATE +READY +LEASES`, r.stdout)
	assert.Regexp(t, `(?m)^llama-8b +ready +yes +0/2 +a\.gguf +0 +0 +0 +closed +-$`, r.stdout)
	assert.Contains(t, r.stdout, "\n2 pools listed.\n")

	r = poolctl(t, "", "list", "-H", "gpu1,ops@gpu2:2222")
	require.Equal(t, 0, r.code, r.stderr)
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	require.Len(t, lines, 7, r.stdout)
	assert.Regexp(t, `^HOST +POOL +STATE +READY +LEASES +MODEL`, lines[0])
	assert.Regexp(t, `^gpu1 +llama-8b +ready `, lines[1])
	assert.Regexp(t, `^gpu1 +qwen +ready `, lines[2])
	assert.Regexp(t, `^ops@gpu2:2222 +llama-8b +ready `, lines[3])
	assert.Regexp(t, `^ops@gpu2:2222 +qwen +ready `, lines[4])
	assert.Equal(t, "4 pools listed.", lines[6])
	t.Logf("poolctl -H gpu1,ops@gpu2:2222 list:\n%s", r.stdout)

	r = poolctl(t, "", "--json", "-H", "gpu1,gpu2", "list")
	require.Equal(t, 0, r.code, r.stderr)
	var pools []map[string]any
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &pools), r.stdout)
	require.Len(t, pools, 4)
	assert.Equal(t, []any{"gpu1", "llama-8b"}, []any{pools[0]["Host"], pools[0]["Id"]})
	assert.Equal(t, []any{"gpu2", "qwen"}, []any{pools[3]["Host"], pools[3]["Id"]})

	// A host that cannot be reached is said; the others are still listed.
	r = poolctl(t, "", "-H", "gpu1,unknown.example", "list")
	assert.Equal(t, 1, r.code)
	assert.Regexp(t, `(?m)^gpu1 +llama-8b +ready `, r.stdout)
	assert.Contains(t, r.stderr, "ssh: Could not resolve hostname unknown.example")
	assert.Contains(t, r.stderr, "poolctl: unknown.example: cannot connect to the system bus of unknown.example: ")
	assert.Contains(t, r.stderr, "poolctl: 1 of 2 hosts could not be read\n")

	// Changes and the journal go through ssh too.
	r = poolctl(t, "", "-H", "gpu1", "stop", "qwen", "--now")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Equal(t, `s "stopped"`, prop("qwen", "State"))
	r = poolctl(t, "", "-H", "gpu1", "start", "qwen")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Equal(t, "b true", prop("qwen", "Ready"))
	require.Eventually(t, func() bool {
		r = poolctl(t, "", "-H", "gpu1", "status", "llama-8b")
		return r.code == 0 && strings.Contains(r.stdout, "engine ready") && strings.Contains(r.stdout, "server is listening")
	}, 20*time.Second, 200*time.Millisecond, "status reads the host's journal:\n%s%s", r.stdout, r.stderr)
	assert.Regexp(t, `(?m)^ +Uptime: -$`, r.stdout, "no local /proc for a remote engine")

	calls, err := os.ReadFile(log)
	require.NoError(t, err)
	assert.Contains(t, string(calls), "-xT -- root@gpu1 systemd-stdio-bridge\n")
	assert.Contains(t, string(calls), "-xT -p 2222 -- ops@gpu2 systemd-stdio-bridge\n")
	assert.Contains(t, string(calls), "-xT -- gpu1 'journalctl' '-b' '-o' 'cat' '_SYSTEMD_UNIT=pool-managerd.service' 'POOL_ID=llama-8b'")
	out, _ := exec.Command("pgrep", "-f", "systemd-stdio-bridge").Output()
	assert.Empty(t, strings.TrimSpace(string(out)), "no bridge is left running")
}
