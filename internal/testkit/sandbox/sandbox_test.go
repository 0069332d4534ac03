package sandbox

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// needRoot skips a test that boots a sandbox from here (not from inside
// one, as Need checks) without root; with CI set the skip is a failure.
func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatal("the sandbox needs root, and CI is set")
	}
	t.Skip("*** SKIPPED: the sandbox needs root ***")
}

// This test drives the harness from outside (it is the one test that does
// not run inside a sandbox).
func TestBootRunTeardown(t *testing.T) {
	needRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	bind := t.TempDir()
	require.NoError(t, os.WriteFile(bind+"/hello", []byte("from the host"), 0o644))
	s, err := Boot(ctx, Options{Nodes: FakeGPUs, Binds: []string{bind}})
	require.NoError(t, err)
	closed := false
	defer func() {
		if !closed {
			s.Close()
		}
	}()

	out, err := s.Run(ctx, "systemctl", "is-active", "dbus.service")
	require.NoError(t, err)
	assert.Equal(t, "active", strings.TrimSpace(out))
	out, err = s.Run(ctx, "cat", bind+"/hello")
	require.NoError(t, err)
	assert.Equal(t, "from the host", out)
	out, err = s.Run(ctx, "stat", "-c", "%F %t:%T", "/dev/nvidia1")
	require.NoError(t, err)
	assert.Equal(t, "character special file c3:1", strings.TrimSpace(out))

	// What happens inside stays inside.
	_, err = s.Run(ctx, "useradd", "--system", "sbprobe")
	require.NoError(t, err)
	_, err = s.Run(ctx, "touch", "/usr/local/sbprobe")
	require.NoError(t, err)
	_, err = os.Stat("/usr/local/sbprobe")
	assert.True(t, os.IsNotExist(err), "a file made inside is not on the host")
	_, err = os.Stat("/dev/nvidia1")
	assert.True(t, os.IsNotExist(err), "fake device nodes are not on the host")
	passwd, _ := os.ReadFile("/etc/passwd")
	assert.NotContains(t, string(passwd), "sbprobe")

	// Its units live under a cgroup of its own, not the host's
	// /system.slice that a sandbox beside it would share.
	cg, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", s.PID))
	require.NoError(t, err)
	assert.Contains(t, string(cg), "/"+s.Tag+"/init.scope")
	_, err = s.Run(ctx, "systemd-run", "--unit=sbprobe.service", "sleep", "60")
	require.NoError(t, err)
	out, err = s.Run(ctx, "systemctl", "show", "-p", "ControlGroup", "--value", "sbprobe.service")
	require.NoError(t, err)
	assert.Equal(t, "/"+s.Tag+"/system.slice/sbprobe.service", strings.TrimSpace(out))
	probes, _ := filepath.Glob("/sys/fs/cgroup/*/" + s.Tag + "/system.slice/sbprobe.service")
	assert.NotEmpty(t, probes, "on the host it is below the sandbox's cgroup")

	pid := s.PID
	require.NoError(t, s.Close())
	closed = true
	assert.ErrorIs(t, syscall.Kill(pid, 0), syscall.ESRCH, "systemd is gone")
	_, err = os.Stat(s.dir)
	assert.True(t, os.IsNotExist(err), "the sandbox directory is gone")
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	assert.NotContains(t, string(mounts), s.Tag)
	left, _ := filepath.Glob("/sys/fs/cgroup/*/" + s.Tag)
	assert.Empty(t, left, "no cgroup of it is left")
}

// A layer's files lie over the host's root inside, and only inside: this
// is how a host without systemd gets one (make gpu-check on a GPU machine).
func TestALayerLiesOverTheRoot(t *testing.T) {
	needRoot(t)
	_, err := Boot(context.Background(), Options{Layer: "/tmp/a:b"})
	require.ErrorContains(t, err, `layer "/tmp/a:b": not an absolute path without ':' or ','`)
	_, err = Boot(context.Background(), Options{Layer: "rel"})
	require.ErrorContains(t, err, "not an absolute path")

	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	layer := t.TempDir()
	require.NoError(t, os.MkdirAll(layer+"/etc", 0o755))
	require.NoError(t, os.WriteFile(layer+"/etc/os-release", []byte("ID=layer\n"), 0o644))
	t.Setenv(LayerEnv, layer)
	s, err := Boot(ctx, Options{})
	require.NoError(t, err)
	defer s.Close()
	out, err := s.Run(ctx, "cat", "/etc/os-release")
	require.NoError(t, err)
	assert.Equal(t, "ID=layer\n", out)
	host, err := os.ReadFile("/etc/os-release")
	require.NoError(t, err)
	assert.NotEqual(t, "ID=layer\n", string(host))
	// The rest of the root is the host's, systemd and dbus among it.
	out, err = s.Run(ctx, "systemctl", "is-active", "dbus.service")
	require.NoError(t, err)
	assert.Equal(t, "active\n", out)
}
