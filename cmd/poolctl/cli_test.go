package main

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	ifaces "github.com/llorch/pool-managerd/dbus"
)

// Time spans read as systemd reads them; a bad one is named in the error.
func TestTimeSpansAreSystemds(t *testing.T) {
	for in, want := range map[string]time.Duration{
		"30s": 30 * time.Second, "5min": 5 * time.Minute, "1h 30min": 90 * time.Minute, "1h30min": 90 * time.Minute,
		"5": 5 * time.Second, "0": 0, "1.5": 1500 * time.Millisecond, "500ms": 500 * time.Millisecond, "250us": 250 * time.Microsecond,
		"2 minutes": 2 * time.Minute, "1d": 24 * time.Hour, "1w 1d": 8 * 24 * time.Hour, "3m": 3 * time.Minute, " 10 sec ": 10 * time.Second,
		"1h 2min 3s 4ms": time.Hour + 2*time.Minute + 3*time.Second + 4*time.Millisecond,
	} {
		d, err := parseSpan(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, d, in)
	}
	for in, msg := range map[string]string{
		"":          "empty time span",
		"soon":      `time span "soon": expected a number at "soon"`,
		"5 parsecs": `time span "5 parsecs": unknown unit "parsecs"`,
		"-1s":       `time span "-1s" is negative`,
		"1..2s":     `time span "1..2s": expected a number at "1..2s"`,
		"1s x":      `time span "1s x": expected a number at "x"`,
		"1e9y":      `time span "1e9y": unknown unit "e"`,
		"300000y":   `time span "300000y" is too long`,
	} {
		_, err := parseSpan(in)
		require.Error(t, err, in)
		assert.Contains(t, err.Error(), msg, in)
	}
}

// parsed runs poolctl's command-line parsing alone.
func parsed(t *testing.T, args ...string) (*cli, string, []string, error) {
	t.Helper()
	c := &cli{stdout: &bytes.Buffer{}, stderr: &bytes.Buffer{}}
	cmd, pos, err := c.parse(args)
	name := ""
	if cmd != nil {
		name = cmd.name
	}
	return c, name, pos, err
}

// Options stand anywhere on the line, as systemctl's do; a command's
// options are its own.
func TestOptionsStandAnywhere(t *testing.T) {
	for _, args := range [][]string{{"--json", "list"}, {"list", "--json"}, {"-json", "list"}} {
		c, name, _, err := parsed(t, args...)
		require.NoError(t, err, args)
		assert.Equal(t, "list", name, args)
		assert.True(t, c.json, args)
	}
	c, name, pos, err := parsed(t, "--deadline", "5", "drain", "llama")
	require.NoError(t, err)
	assert.Equal(t, "drain", name)
	assert.Equal(t, []string{"llama"}, pos)
	assert.Equal(t, 5*time.Second, c.deadline)

	c, _, _, err = parsed(t, "stop", "llama")
	require.NoError(t, err)
	assert.Equal(t, 30*time.Second, c.deadline, "stop drains for 30s unless told")
	c, _, _, err = parsed(t, "stop", "--now", "llama")
	require.NoError(t, err)
	assert.Zero(t, c.deadline, "--now is a deadline of 0")
	c, _, _, err = parsed(t, "reload", "llama", "m.gguf", "--deadline", "1h 30min", "--runtime")
	require.NoError(t, err)
	assert.Equal(t, 90*time.Minute, c.deadline)
	assert.True(t, c.runtime)
	c, _, pos, err = parsed(t, "show", "-p", "State,Ready", "llama", "--property", "Model", "--value")
	require.NoError(t, err)
	assert.Equal(t, []string{"llama"}, pos)
	assert.Equal(t, []string{"State", "Ready", "Model"}, c.propNames)
	assert.True(t, c.valueOnly)
	c, _, _, err = parsed(t, "logs", "llama", "-f", "-n", "20")
	require.NoError(t, err)
	assert.True(t, c.followLog)
	assert.Equal(t, "20", c.lines)
	c, _, _, err = parsed(t, "wait", "llama", "--for", "stopped", "--timeout", "2min")
	require.NoError(t, err)
	assert.Equal(t, "stopped", c.waitFor)
	assert.Equal(t, 2*time.Minute, c.timeout)
	c, _, _, err = parsed(t, "-H", "root@gpu1,gpu2:2222", "list")
	require.NoError(t, err)
	assert.Equal(t, []string{"root@gpu1", "gpu2:2222"}, c.hosts)
	_, _, pos, err = parsed(t, "reload", "--", "-odd", "--deadline")
	require.NoError(t, err)
	assert.Equal(t, []string{"-odd", "--deadline"}, pos)

	for _, c := range []struct {
		args []string
		msg  string
	}{
		{[]string{"start", "--deadline", "5", "llama"}, "start takes no option --deadline"},
		{[]string{"list", "--frob"}, "unknown option --frob"},
		{[]string{"drain", "llama", "--deadline", "soon"}, `--deadline: time span "soon": expected a number`},
		{[]string{"drain", "llama", "--deadline", "-1s"}, `--deadline: time span "-1s" is negative`},
		{[]string{"stop", "llama", "--now", "--deadline", "5s"}, "stop: --now and --deadline 5s contradict each other"},
		{[]string{"wait", "llama", "--for", "up"}, `wait: --for "up" is no pool state`},
		{[]string{"logs", "llama", "-n", "-3"}, `logs: -n "-3" is no number of lines`},
		{[]string{"-H", "a,b", "status", "llama"}, "status acts on one host; several hosts (-H a,b) are for list"},
		{[]string{"-H", "-oProxyCommand=x", "list"}, `a host name does not start with '-'`},
		{[]string{"-H", "a b", "list"}, "a host name holds no spaces"},
		{[]string{"--bus", "unix:path=/x", "-H", "a", "list"}, "--bus and -H exclude each other"},
		{[]string{"stop"}, "stop takes POOL, got 0 argument(s)"},
		{[]string{"frobnicate"}, `unknown command "frobnicate"`},
	} {
		_, _, _, err := parsed(t, c.args...)
		var ue usageError
		require.ErrorAs(t, err, &ue, "%q", c.args)
		assert.Contains(t, ue.msg, c.msg, "%q", c.args)
	}
}

// Exit statuses are systemctl's: 4 for a pool the daemon does not have,
// 1 for other failures with the D-Bus error name, 2 for usage.
func TestExitStatusNamesTheFailure(t *testing.T) {
	for _, c := range []struct {
		err  error
		code int
		out  string
	}{
		{nil, 0, ""},
		{dbus.Error{Name: ifaces.ErrNoSuchPool, Body: []any{`no pool "x"`}}, 4, "poolctl: org.llorch.PoolManager1.Error.NoSuchPool: no pool \"x\"\n"},
		{&dbus.Error{Name: ifaces.ErrNoSuchPool}, 4, "poolctl: org.llorch.PoolManager1.Error.NoSuchPool\n"},
		{dbus.Error{Name: ifaces.ErrBusy, Body: []any{"pool x is draining"}}, 1, "poolctl: org.llorch.PoolManager1.Error.Busy: pool x is draining\n"},
		{dbus.Error{Name: unknownMethod, Body: []any{`No such method "Enable"`}}, 1, "poolctl: org.freedesktop.DBus.Error.UnknownMethod: No such method \"Enable\"; pool-managerd is older than this poolctl\n"},
		{errors.New("cannot connect"), 1, "poolctl: cannot connect\n"},
		{quietFailure, 1, ""},
		{usageError{"stop", "bad"}, 2, "poolctl: bad\nTry 'poolctl stop --help'.\n"},
		{errInterrupted, 130, ""},
	} {
		var out bytes.Buffer
		assert.Equal(t, c.code, report(&out, c.err), "%v", c.err)
		assert.Equal(t, c.out, out.String(), "%v", c.err)
	}
}

// The calls of reload --runtime, enable and disable carry exactly the
// signatures of the daemon's API; a plain reload stays Reload, which every
// daemon has.
func TestNewMethodsCarryTheAPIsSignatures(t *testing.T) {
	name, args := reloadCall("llama", "m.gguf", 1500*time.Millisecond, false)
	assert.Equal(t, "Reload", name)
	assert.Equal(t, "sst", dbus.SignatureOf(args...).String())
	assert.Equal(t, []any{"llama", "m.gguf", uint64(1500)}, args)

	name, args = reloadCall("llama", "m.gguf", 30*time.Second, true)
	assert.Equal(t, "ReloadEx", name)
	assert.Equal(t, "ssta{sv}", dbus.SignatureOf(args...).String())
	assert.Equal(t, []any{"llama", "m.gguf", uint64(30000), map[string]dbus.Variant{"runtime": dbus.MakeVariant(true)}}, args)

	for _, enable := range []bool{true, false} {
		for _, runtime := range []bool{true, false} {
			name, args := autoStartCall(enable, "llama", runtime)
			assert.Equal(t, map[bool]string{true: "Enable", false: "Disable"}[enable], name)
			assert.Equal(t, "sb", dbus.SignatureOf(args...).String())
			assert.Equal(t, []any{"llama", runtime}, args)
		}
	}
}

// A refused configuration lists its reasons a line each, each escaped.
func TestDaemonReloadPrintsEachReasonOnALine(t *testing.T) {
	err := reasons(dbus.Error{Name: ifaces.ErrInvalidArgument, Body: []any{"configuration refused:\n/etc/pool-managerd/pools.d/a.pool:3: unknown key Foo\n/etc/pool-managerd/pools.d/b.pool:1: bad\x1b[2J\n"}})
	var out bytes.Buffer
	assert.Equal(t, 1, report(&out, err))
	assert.Equal(t, "poolctl: org.llorch.PoolManager1.Error.InvalidArgument: configuration refused:\n"+
		"  /etc/pool-managerd/pools.d/a.pool:3: unknown key Foo\n"+
		"  /etc/pool-managerd/pools.d/b.pool:1: bad\\x1b[2J\n", out.String())
	one := dbus.Error{Name: ifaces.ErrInvalidArgument, Body: []any{"one reason"}}
	assert.Equal(t, one, reasons(one))
}

// -H reaches a host as systemctl -H does: ssh -xT, a port after a colon,
// a user before an at sign.
func TestHostsBecomeSSHArguments(t *testing.T) {
	for host, want := range map[string][]string{
		"gpu1":              {"-xT", "--", "gpu1"},
		"root@gpu1":         {"-xT", "--", "root@gpu1"},
		"ops@gpu1:2222":     {"-xT", "-p", "2222", "--", "ops@gpu1"},
		"[fe80::1]:22":      {"-xT", "-p", "22", "--", "fe80::1"},
		"fe80::1":           {"-xT", "--", "fe80::1"},
		"a@b@gpu1.example":  {"-xT", "--", "a@b@gpu1.example"},
		"gpu1.example.com:": {"-xT", "-p", "", "--", "gpu1.example.com"},
	} {
		assert.Equal(t, want, sshArgs(host), host)
	}
	// A command line for the remote shell: what it runs is argv exactly.
	argv := []string{"printf", `%s\n`, "it's", "$(touch /tmp/owned)", "a b", "POOL_ID=x;y"}
	cmd := remoteCommand("gpu1", argv)
	require.Equal(t, []string{"ssh", "-xT", "--", "gpu1"}, cmd.Args[:4])
	require.Len(t, cmd.Args, 5, "one command line, as ssh passes it")
	out, err := exec.Command("sh", "-c", cmd.Args[4]).Output()
	require.NoError(t, err)
	assert.Equal(t, strings.Join(argv[2:], "\n")+"\n", string(out))
}

// logs asks journalctl for the daemon's own entries about the pool, its
// engine's scope and systemd's lines about the scope, nothing else.
func TestLogsMatchesOnlyThePoolsEntries(t *testing.T) {
	assert.Equal(t, []string{"-n", "5", "-f",
		"_SYSTEMD_UNIT=pool-managerd.service", "POOL_ID=llama", "+", "_SYSTEMD_UNIT=pool-engine-llama.scope", "+", "_PID=1", "UNIT=pool-engine-llama.scope"},
		logArgs("llama", "pool-engine-llama.scope", "5", true))
	assert.Equal(t, []string{"_SYSTEMD_UNIT=pool-managerd.service", "POOL_ID=llama", "+", "_SYSTEMD_UNIT=s.scope", "+", "_PID=1", "UNIT=s.scope"},
		logArgs("llama", "s.scope", "", false))
	var out bytes.Buffer
	copyLines(&out, strings.NewReader("a\nengine: "+forged+"\n"+strings.Repeat("x", 1<<20)))
	lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	require.Len(t, lines, 4)
	assert.Equal(t, `● llama-8b - ready\x1b[2J`, lines[2])
	assert.Len(t, lines[3], 1<<20, "a long line is copied whole")
	assertNoControl(t, out.String())
}

// show prints NAME=VALUE for scripts: booleans as yes and no, numbers as
// they are.
func TestShowValues(t *testing.T) {
	assert.Equal(t, "yes", showValue(dbus.MakeVariant(true)))
	assert.Equal(t, "0.25", showValue(dbus.MakeVariant(0.25)))
	assert.Equal(t, "-1", showValue(dbus.MakeVariant(-1.0)))
	assert.Equal(t, "1767225600000000", showValue(dbus.MakeVariant(uint64(1767225600000000))))
	assert.Equal(t, "0", showValue(dbus.MakeVariant(uint32(0))))
}

// Models complete from the allowed model directories only: relative to
// ModelsDir, absolute beneath a ModelDirs= entry; never the current
// directory and never above an allowed one.
func TestModelsCompleteFromTheAllowedDirectories(t *testing.T) {
	root := t.TempDir()
	models, extra, cwd := filepath.Join(root, "models"), filepath.Join(root, "extra"), filepath.Join(root, "cwd")
	for _, f := range []string{"models/a.gguf", "models/b.gguf", "models/sub/c.gguf", "models/.hidden", "extra/x.gguf", "cwd/here.gguf", "secret.gguf"} {
		require.NoError(t, os.MkdirAll(filepath.Dir(filepath.Join(root, f)), 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(root, f), nil, 0o644))
	}
	t.Chdir(cwd)
	dirs := []string{extra}
	assert.Equal(t, []string{"a.gguf", "b.gguf", "sub/"}, modelCandidates(models, dirs, ""))
	assert.Equal(t, []string{"a.gguf"}, modelCandidates(models, dirs, "a"))
	assert.Equal(t, []string{"sub/c.gguf"}, modelCandidates(models, dirs, "sub/"))
	assert.Equal(t, []string{".hidden"}, modelCandidates(models, dirs, "."))
	assert.Empty(t, modelCandidates(models, dirs, "h"), "not the current directory")
	assert.Empty(t, modelCandidates(models, dirs, "../"))
	assert.Empty(t, modelCandidates(models, dirs, "sub/../.."))
	assert.Equal(t, []string{extra + "/", models + "/"}, modelCandidates(models, dirs, root+"/"))
	assert.Equal(t, []string{extra + "/x.gguf"}, modelCandidates(models, dirs, extra+"/"))
	assert.Equal(t, []string{models + "/sub/c.gguf"}, modelCandidates(models, dirs, models+"/sub/c"))
	assert.Empty(t, modelCandidates(models, dirs, extra+"/../"))
	assert.Empty(t, modelCandidates(models, dirs, "/"+"etc/"))

	// The directories come from the daemon's configuration and its drop-ins.
	conf := filepath.Join(root, "etc")
	require.NoError(t, os.MkdirAll(filepath.Join(conf, "pool-managerd.conf.d"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(conf, "pool-managerd.conf"), []byte("[Manager]\nModelsDir="+models+"\n"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(conf, "pool-managerd.conf.d", "10-more.conf"), []byte("[Manager]\nModelDirs="+extra+"\n"), 0o644))
	var out bytes.Buffer
	c := &cli{stdout: &out, stderr: &out, configDir: conf}
	require.NoError(t, c.completeModels([]string{root + "/e"}))
	assert.Equal(t, extra+"/\n", out.String())
	out.Reset()
	require.NoError(t, c.completeModels([]string{""}))
	assert.Equal(t, "a.gguf\nb.gguf\nsub/\n", out.String())
}
