package install

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

const inventory = `[Inventory]
Device=0 GPU-8f2c1a70-0000-4000-8000-000000000000 /dev/nvidia0
Device=1 GPU-8f2c1a70-0000-4000-8000-000000000001 /dev/nvidia1
ControlDevice=/dev/nvidiactl
`

// installDeb installs the .deb on the given manager drop-in (after the
// inventory) and pool files, with tiny.gguf in the model store; the
// package is purged and what the test made is removed afterwards, also on
// failure.
func installDeb(t *testing.T, manager string, pools map[string][]byte) {
	t.Helper()
	t.Cleanup(func() {
		exec.Command("dpkg", "-P", "pool-managerd").Run()
		exec.Command("systemctl", "stop", "pool-engine-*.scope").Run()
		os.RemoveAll("/etc/pool-managerd")
		os.RemoveAll("/var/lib/pool-managerd")
		os.RemoveAll("/var/cache/pool-managerd")
	})
	require.NoError(t, os.MkdirAll("/etc/pool-managerd/pool-managerd.conf.d", 0o755))
	require.NoError(t, os.MkdirAll("/etc/pool-managerd/pools.d", 0o755))
	require.NoError(t, os.WriteFile("/etc/pool-managerd/pool-managerd.conf.d/gpus.conf", []byte(inventory+manager), 0o644))
	for id, data := range pools {
		require.NoError(t, os.WriteFile("/etc/pool-managerd/pools.d/"+id+".pool", data, 0o644))
	}
	if _, err := os.Stat("/var/lib/pool-managerd/models"); os.IsNotExist(err) {
		require.NoError(t, os.MkdirAll("/var/lib/pool-managerd/models", 0o755))
	}
	require.NoError(t, os.WriteFile("/var/lib/pool-managerd/models/tiny.gguf", []byte("GGUF\x03\x00\x00\x00 tiny"), 0o644))
	if out, err := exec.Command("dpkg", "-i", glob(t, "pool-managerd_*.deb")).CombinedOutput(); err != nil {
		j, _ := exec.Command("journalctl", "--no-pager", "-n", "60", "-o", "short-monotonic").CombinedOutput()
		t.Fatalf("dpkg -i: %v: %s\njournal:\n%s", err, out, j)
	}
}

func poolProperty(id, name string) string {
	out, _ := exec.Command("busctl", "get-property", "org.llorch.PoolManager1", "/org/llorch/PoolManager1/pool/"+id,
		"org.llorch.PoolManager1.Pool", name).CombinedOutput()
	return strings.TrimSpace(string(out))
}

func waitReady(t *testing.T, id string) {
	t.Helper()
	require.Eventually(t, func() bool { return poolProperty(id, "Ready") == "b true" }, 30*time.Second, 100*time.Millisecond,
		"pool %s ready; journal:\n%s", id, journal())
}

func journal() string {
	j, _ := exec.Command("journalctl", "--no-pager", "-n", "40", "-o", "cat").CombinedOutput()
	return string(j)
}

type owner struct {
	uid, gid uint32
	mode     os.FileMode
}

func ownerOf(t *testing.T, path string) owner {
	t.Helper()
	st, err := os.Stat(path)
	require.NoError(t, err)
	s := st.Sys().(*syscall.Stat_t)
	return owner{s.Uid, s.Gid, st.Mode().Perm()}
}

// node_exporter's textfile directory and the operator's model store are
// made when missing, and keep their owner and mode through an install, an
// upgrade, a tmpfiles run and a purge.
func TestTmpfilesLeaveTheTextfileDirectoryAndModelsToTheirOwners(t *testing.T) {
	sandbox.Need(t)
	// Debian's prometheus package (promtool) may have made its user.
	for _, u := range []string{"prometheus", "mlops"} {
		if exec.Command("getent", "passwd", u).Run() == nil {
			continue
		}
		sh(t, "useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", u)
		t.Cleanup(func() { exec.Command("userdel", u).Run() })
	}
	t.Cleanup(func() { os.RemoveAll("/var/lib/prometheus") })
	const textfiles = "/var/lib/prometheus/node-exporter"
	const models = "/var/lib/pool-managerd/models"
	require.NoError(t, os.RemoveAll("/var/lib/prometheus"))
	require.NoError(t, os.MkdirAll(models, 0o750))
	sh(t, "chown", "mlops:mlops", models)
	require.NoError(t, os.Chmod(models, 0o2770))
	want := map[string]owner{models: ownerOf(t, models)}

	installDeb(t, "", nil)
	assert.Equal(t, owner{0, 0, 0o755}, ownerOf(t, textfiles), "made when missing")
	// node_exporter's package, installed later, takes it.
	sh(t, "chown", "prometheus:prometheus", textfiles)
	require.NoError(t, os.Chmod(textfiles, 0o750))
	want[textfiles] = ownerOf(t, textfiles)
	for p, o := range want {
		assert.Equal(t, o, ownerOf(t, p), "%s after dpkg -i", p)
	}
	sh(t, "systemd-tmpfiles", "--create")
	for p, o := range want {
		assert.Equal(t, o, ownerOf(t, p), "%s after systemd-tmpfiles --create", p)
	}
	sh(t, "dpkg", "-i", glob(t, "pool-managerd_*.deb"))
	for p, o := range want {
		assert.Equal(t, o, ownerOf(t, p), "%s after an upgrade", p)
	}
	sh(t, "dpkg", "-P", "pool-managerd")
	for p, o := range want {
		assert.Equal(t, o, ownerOf(t, p), "%s after dpkg -P", p)
	}
}

// A purge removes what the daemon made in its state directory (staged
// models, state files), wherever the manager file puts it, and never a
// model of the operator's, also one beside the state.
func TestPurgeKeepsOperatorModels(t *testing.T) {
	sandbox.Need(t)
	sim := os.Getenv(sandbox.BinEnv("pool-engine-sim"))
	t.Cleanup(func() { os.RemoveAll("/srv/pmd"); os.RemoveAll("/srv/pmd-cache") })
	// A CacheDir= of the operator's, with a file of theirs in it.
	require.NoError(t, os.MkdirAll("/srv/pmd-cache", 0o755))
	require.NoError(t, os.WriteFile("/srv/pmd-cache/notes", []byte("mine"), 0o644))
	installDeb(t, "[Manager]\nStateDir=/srv/pmd\nCacheDir=/srv/pmd-cache\n", map[string][]byte{"alpha": testpool.SimPoolFile(sim, "0", "tiny.gguf", 18441, "")})
	require.NoError(t, os.MkdirAll("/var/lib/pool-managerd/llm", 0o755))
	require.NoError(t, os.WriteFile("/var/lib/pool-managerd/llm/other.gguf", []byte("GGUF other"), 0o644))
	waitReady(t, "alpha")
	staged, err := filepath.Glob("/srv/pmd/staged/*/tiny.gguf")
	require.NoError(t, err)
	require.NotEmpty(t, staged, "the model was staged")
	_, err = os.Stat("/srv/pmd-cache/alpha")
	require.NoError(t, err, "the pool's cache directory")

	sh(t, "dpkg", "-P", "pool-managerd")
	for _, p := range []string{"/srv/pmd/staged", "/srv/pmd/pools", "/etc/pool-managerd", "/srv/pmd-cache/alpha", "/var/cache/pool-managerd"} {
		_, err := os.Stat(p)
		assert.True(t, os.IsNotExist(err), "a purge removes %s", p)
	}
	for p, data := range map[string]string{"/var/lib/pool-managerd/models/tiny.gguf": "GGUF\x03\x00\x00\x00 tiny", "/var/lib/pool-managerd/llm/other.gguf": "GGUF other", "/srv/pmd-cache/notes": "mine"} {
		b, err := os.ReadFile(p)
		if assert.NoError(t, err, "a purge keeps %s", p) {
			assert.Equal(t, data, string(b))
		}
	}
}

var policyText = regexp.MustCompile(`(?s)<!DOCTYPE busconfig.*?</busconfig>\n`)

// AdminGroup= other than pool-admin: --check-config names the bus policy
// it lacks and gives its text; with that text in /etc/dbus-1/system.d a
// member of the group drains and takes leases, without it the bus refuses.
func TestAnotherAdminGroupWorksOnTheBusWithThePolicyCheckConfigGives(t *testing.T) {
	sandbox.Need(t)
	sh(t, "groupadd", "--system", "ops")
	sh(t, "useradd", "--no-create-home", "--shell", "/bin/sh", "-G", "ops", "alice")
	t.Cleanup(func() {
		os.Remove("/etc/dbus-1/system.d/pool-managerd-ops.conf")
		exec.Command("busctl", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "ReloadConfig").Run()
		exec.Command("userdel", "alice").Run()
		exec.Command("groupdel", "ops").Run()
	})
	sim := os.Getenv(sandbox.BinEnv("pool-engine-sim"))
	installDeb(t, "[Manager]\nAdminGroup=ops\n", map[string][]byte{"alpha": testpool.SimPoolFile(sim, "0", "tiny.gguf", 18451, "")})
	waitReady(t, "alpha")

	asAlice := func(args ...string) (string, error) {
		out, err := exec.Command("setpriv", append([]string{"--reuid=alice", "--regid=alice", "--init-groups", "busctl", "--timeout=60", "call",
			"org.llorch.PoolManager1", "/org/llorch/PoolManager1", "org.llorch.PoolManager1.Manager"}, args...)...).CombinedOutput()
		return strings.TrimSpace(string(out)), err
	}
	checkConfig := func() string {
		out, err := exec.Command("/usr/bin/pool-managerd", "--check-config").CombinedOutput()
		require.NoError(t, err, "%s", out)
		return string(out)
	}

	out := checkConfig()
	assert.Contains(t, out, "warning: AdminGroup=ops: no D-Bus policy")
	assert.Contains(t, out, "/etc/dbus-1/system.d/pool-managerd-ops.conf")
	policy := policyText.FindString(out)
	require.NotEmpty(t, policy, "the policy text in:\n%s", out)
	res, err := asAlice("AcquireLease", "s", "alpha")
	assert.Error(t, err, "without the policy the bus refuses: %s", res)
	assert.Regexp(t, "Rejected send message|Access denied", res)

	require.NoError(t, os.WriteFile("/etc/dbus-1/system.d/pool-managerd-ops.conf", []byte(policy), 0o644))
	sh(t, "busctl", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "ReloadConfig")
	assert.NotContains(t, checkConfig(), "AdminGroup=ops")
	res, err = asAlice("AcquireLease", "s", "alpha")
	require.NoError(t, err, res)
	assert.Regexp(t, `^s ".+"$`, res)
	res, err = asAlice("Drain", "st", "alpha", "5000")
	require.NoError(t, err, res)
	assert.Equal(t, `s "drained"`, res)
	// Someone outside the group is still refused.
	out2, err := exec.Command("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "busctl", "call",
		"org.llorch.PoolManager1", "/org/llorch/PoolManager1", "org.llorch.PoolManager1.Manager", "Start", "s", "alpha").CombinedOutput()
	assert.Error(t, err, fmt.Sprintf("%s", out2))
}

// Both packages install the Grafana dashboard, as the checkout has it,
// under /usr/share/pool-managerd, and the .rpm owns that directory so
// that rpm -e removes it.
func TestPackagesInstallTheGrafanaDashboard(t *testing.T) {
	sandbox.Need(t)
	const dir = "/usr/share/pool-managerd"
	const dashboard = dir + "/pool-managerd.dashboard.json"
	want, err := os.ReadFile("../../../packaging/pool-managerd.dashboard.json")
	require.NoError(t, err)

	fsys, err := exec.Command("dpkg-deb", "--fsys-tarfile", glob(t, "pool-managerd_*.deb")).Output()
	require.NoError(t, err)
	entries := map[string]*tar.Header{}
	var got []byte
	tr := tar.NewReader(bytes.NewReader(fsys))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		require.NoError(t, err)
		name := "/" + strings.Trim(strings.TrimPrefix(h.Name, "."), "/")
		entries[name] = h
		if name == dashboard {
			got, err = io.ReadAll(tr)
			require.NoError(t, err)
		}
	}
	if h, ok := entries[dashboard]; assert.True(t, ok, "the .deb holds %s", dashboard) {
		assert.Equal(t, []any{int64(0o644), 0, 0}, []any{h.Mode & 0o7777, h.Uid, h.Gid}, "mode, owner and group")
		assert.True(t, bytes.Equal(want, got), "the .deb's dashboard is the checkout's")
	}
	if h, ok := entries[dir]; assert.True(t, ok, "the .deb holds %s", dir) {
		assert.Equal(t, byte(tar.TypeDir), h.Typeflag)
	}

	rpm, err := rpmFiles(glob(t, "pool-managerd-*.rpm"))
	require.NoError(t, err)
	assert.True(t, slices.Contains(rpm, dashboard), "the .rpm holds %s", dashboard)
	assert.True(t, slices.Contains(rpm, dir), "the .rpm owns %s", dir)
}

// The daemon the packages ship is the plain build: the soak's profiling
// hook is only in the soak's own build of it.
func TestShippedDaemonHasNoSoakHook(t *testing.T) {
	sandbox.Need(t)
	b, err := os.ReadFile("../../../build/pool-managerd")
	require.NoError(t, err)
	const mod = "github.com/llorch/pool-managerd/internal/"
	require.True(t, bytes.Contains(b, []byte(mod+"supervisor")), "the binary names its packages")
	assert.False(t, bytes.Contains(b, []byte(mod+"soak")), "build/pool-managerd holds internal/tools/soak")
}
