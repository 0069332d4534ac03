package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/config"
)

// An AdminGroup= other than pool-admin needs a bus policy of its own:
// --check-config names the missing one and gives its text, and is quiet
// once a policy file lets the group call the Manager interface.
func TestCheckConfigNamesTheMissingBusPolicyOfAnAdminGroup(t *testing.T) {
	onlyListPools := `<busconfig><policy group="root"><allow send_destination="org.llorch.PoolManager1"
 send_interface="org.llorch.PoolManager1.Manager" send_member="ListPools"/></policy></busconfig>`
	otherDest := `<busconfig><policy group="root"><allow send_destination="org.example.Other"/></policy></busconfig>`
	for _, tc := range []struct {
		name  string
		group string
		files map[string]string // in the operator's directory
		want  []string          // empty: no warning
	}{
		{name: "pool-admin is the package's", group: "pool-admin"},
		{name: "no policy", group: "root", want: []string{
			"AdminGroup=root: no D-Bus policy", "members get AccessDenied",
			"/etc/dbus-1/system.d/pool-managerd-root.conf", `<policy group="root">`, "ReloadConfig"}},
		{name: "the drop-in", group: "root", files: map[string]string{"pool-managerd-root.conf": BusPolicy("root")}},
		{name: "only ListPools allowed", group: "root", files: map[string]string{"a.conf": onlyListPools}, want: []string{"no D-Bus policy"}},
		{name: "another destination", group: "root", files: map[string]string{"a.conf": otherDest}, want: []string{"no D-Bus policy"}},
		{name: "a broken file is named", group: "root", files: map[string]string{"pool-managerd-root.conf": BusPolicy("root"), "bad.conf": "<busconfig"},
			want: []string{"bad.conf: not a bus policy"}},
		{name: "a group that does not exist", group: "no-such-group-xyz", files: map[string]string{"p.conf": BusPolicy("no-such-group-xyz")},
			want: []string{"group no-such-group-xyz does not exist on this host"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pkg, etc := t.TempDir(), t.TempDir()
			require.NoError(t, os.WriteFile(filepath.Join(pkg, "org.llorch.PoolManager1.conf"), mustRead(t, "../../dbus/org.llorch.PoolManager1.conf"), 0o644))
			for name, data := range tc.files {
				require.NoError(t, os.WriteFile(filepath.Join(etc, name), []byte(data), 0o644))
			}
			got := adminGroupWarning(tc.group, []string{pkg, etc})
			if len(tc.want) == 0 {
				assert.Empty(t, got)
			}
			for _, w := range tc.want {
				assert.Contains(t, got, w)
			}
		})
	}
}

// The text --check-config gives is a policy the bus accepts and that the
// check itself counts.
func TestBusPolicyTextAllowsTheGroup(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "p.conf"), []byte(BusPolicy("ops")), 0o644))
	allowed, errs := busPolicyAllows([]string{dir}, "ops")
	assert.True(t, allowed)
	assert.Empty(t, errs)
	allowed, _ = busPolicyAllows([]string{dir}, "other")
	assert.False(t, allowed)
}

// The unit allows only loopback addresses to the daemon: a non-loopback
// MetricsListen= or HealthURL= host is named with the drop-in it needs.
func TestCheckConfigNamesAddressesTheUnitBlocks(t *testing.T) {
	for _, tc := range []struct {
		name, listen, health string
		want                 string
	}{
		{name: "loopback listener", listen: "127.0.0.1:9464"},
		{name: "IPv6 loopback listener", listen: "[::1]:9464"},
		{name: "localhost listener", listen: "localhost:9464"},
		{name: "all addresses", listen: "0.0.0.0:9464", want: "MetricsListen=0.0.0.0:9464: the unit allows only localhost"},
		{name: "empty host", listen: ":9464", want: "remote scrapers get no answer"},
		{name: "loopback probe", health: "http://127.0.0.1:%p/health"},
		{name: "remote probe", health: "http://10.1.2.3:%p/health", want: "pool p: HealthURL= host 10.1.2.3 is not loopback"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &config.Config{Manager: config.DefaultManager()}
			c.Manager.MetricsTextfile = ""
			c.Manager.MetricsListen = tc.listen
			if tc.health != "" {
				c.Pools = []*config.Pool{{ID: "p", Engine: config.Engine{Port: 8080, HealthURL: tc.health}}}
			}
			got := hostWarnings(c, nil)
			if tc.want == "" {
				assert.Empty(t, got)
				return
			}
			require.Len(t, got, 1)
			assert.Contains(t, got[0], tc.want)
			assert.Contains(t, got[0], "IPAddressAllow=")
		})
	}
}

// Under the unit root has no CAP_DAC_OVERRIDE: a textfile directory it
// does not own is named.
func TestCheckConfigNamesATextfileDirectoryRootCannotWrite(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chown needs root")
	}
	for _, tc := range []struct {
		name     string
		uid, gid int
		mode     os.FileMode
		warn     bool
	}{
		{name: "root's", uid: 0, gid: 0, mode: 0o755},
		{name: "root's group, group-writable", uid: 65534, gid: 0, mode: 0o775},
		{name: "another user's", uid: 65534, gid: 65534, mode: 0o755, warn: true},
		{name: "another user's, closed", uid: 65534, gid: 65534, mode: 0o750, warn: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "textfiles")
			require.NoError(t, os.Mkdir(dir, 0o700))
			require.NoError(t, os.Chown(dir, tc.uid, tc.gid))
			require.NoError(t, os.Chmod(dir, tc.mode))
			got := textfileDirWarning(dir)
			if !tc.warn {
				assert.Empty(t, got)
				return
			}
			assert.Contains(t, got, dir)
			assert.Contains(t, got, "not writable by root without CAP_DAC_OVERRIDE")
		})
	}
}

// --check-config still exits 0 on a valid configuration, with the
// warnings on stderr.
func TestCheckConfigWarnsOnStderrAndSucceeds(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "pools.d"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pool-managerd.conf"), []byte("[Manager]\nAdminGroup=root\nMetricsTextfile=\n"), 0o644))
	var out, errb bytes.Buffer
	rc := run([]string{"--config-dir", dir, "--check-config"}, &out, &errb)
	require.Equal(t, exitOK, rc, errb.String())
	assert.Contains(t, out.String(), "admin group root")
	assert.Contains(t, errb.String(), "warning: AdminGroup=root: no D-Bus policy")
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	return b
}

// pool-managerd(8) documents the same policy text --check-config gives.
func TestManPageGivesTheBusPolicyOfCheckConfig(t *testing.T) {
	assert.Contains(t, string(mustRead(t, "../../packaging/man/pool-managerd.8.md")), "```\n"+BusPolicy("ops")+"```\n")
}

// An engine run as root is allowed, but --check-config says so and what to
// do instead.
func TestCheckConfigWarnsOfAnEngineRunAsRoot(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "pools.d"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pool-managerd.conf"),
		[]byte("[Manager]\nMetricsTextfile=\n[Inventory]\nBackend=static\nDevice=0 GPU-8f2c1a70-0000-4000-8000-000000000000 /dev/nvidia0\n"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "m.gguf"), []byte("GGUF\x03\x00\x00\x00 m"), 0o644))
	for d := dir; d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
		require.NoError(t, os.Chmod(d, 0o755), "whatever the default user, it reaches the model")
	}
	pool := "[Pool]\nDevices=0\nModel=" + dir + "/m.gguf\n[Engine]\nExecStart=/bin/sh --model %m --port %p\nPort=8081\nUser=root\n"
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", "r.pool"), []byte(pool), 0o644))
	var out, errb bytes.Buffer
	rc := run([]string{"--config-dir", dir, "--check-config"}, &out, &errb)
	require.Equal(t, exitOK, rc, errb.String())
	assert.Contains(t, out.String(), "pool r")
	assert.Contains(t, errb.String(), "warning: pool r: User=root runs the engine as root")

	require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", "r.pool"), []byte(strings.Replace(pool, "User=root\n", "", 1)), 0o644))
	errb.Reset()
	require.Equal(t, exitOK, run([]string{"--config-dir", dir, "--check-config"}, &out, &errb), errb.String())
	assert.NotContains(t, errb.String(), "User=")
}
