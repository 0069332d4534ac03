package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	ifaces "github.com/llorch/pool-managerd/dbus"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// The tests run the poolctl binary against the daemon installed as
// pool-managerd.service with the shipped bus policy, in a sandbox with a
// real systemd, system bus and journal: as root, as a user who may only
// read, on a pipe and on a terminal.
func TestMain(m *testing.M) {
	opts := testpool.Options
	opts.Prepare = append(opts.Prepare,
		[]string{"groupadd", "--system", "pool-admin"},
		[]string{"useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", viewer})
	os.Exit(sandbox.Main(m, opts, sandbox.Build(
		"github.com/llorch/pool-managerd/cmd/pool-managerd",
		"github.com/llorch/pool-managerd/cmd/pool-managerd-shim",
		"github.com/llorch/pool-managerd/cmd/poolctl",
		testpool.Sim)))
}

// viewer is a user in no admin group.
const viewer = "viewer"

const managerConf = `[Manager]
StateDir=%[1]s/state
RuntimeDir=%[1]s/run
CacheDir=%[1]s/cache
ModelsDir=%[1]s/models
MetricsTextfile=%[1]s/pool-managerd.prom
[Inventory]
Backend=static
Device=0 GPU-8f2c1a70-0000-4000-8000-000000000000 /dev/nvidia0
Device=1 GPU-8f2c1a70-0000-4000-8000-000000000001 /dev/nvidia1
ControlDevice=/dev/nvidiactl
`

// daemon starts pool-managerd on two simulator pools, llama-8b (GPU 0, two
// slots) and qwen (GPU 1), and waits until both are ready; it returns the
// configuration directory (models in models/).
func daemon(t *testing.T) string {
	t.Helper()
	return daemonWith(t, "")
}

// daemonWith is daemon with more lines in llama-8b's [Pool] section.
func daemonWith(t *testing.T, llamaPool string) string {
	t.Helper()
	sandbox.Need(t)
	dir, err := os.MkdirTemp("", "poolctl-test-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	for _, d := range []string{"pools.d", "models"} {
		require.NoError(t, os.MkdirAll(filepath.Join(dir, d), 0o755))
	}
	for _, m := range []string{"a.gguf", "b.gguf"} {
		require.NoError(t, os.WriteFile(filepath.Join(dir, "models", m), []byte("GGUF\x03\x00\x00\x00 "+m), 0o644))
	}
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pool-managerd.conf"), fmt.Appendf(nil, managerConf, dir), 0o644))
	const more = "Version=sim-1\n[Health]\nIntervalSec=0.2\nTimeoutSec=0.2\n[Restart]\nBackoffInitialSec=0.2\n"
	sim := os.Getenv(sandbox.BinEnv("pool-engine-sim"))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", "llama-8b.pool"),
		testpool.SimPoolFile(sim, "0", "a.gguf", freePort(t), more+"[Pool]\nSlots=2\n"+llamaPool), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", "qwen.pool"),
		testpool.SimPoolFile(sim, "1", "b.gguf", freePort(t), more), 0o644))
	t.Cleanup(func() {
		exec.Command("systemctl", "stop", "pool-managerd.service").Run()
		exec.Command("systemctl", "stop", "pool-engine-*.scope").Run()
	})
	require.NoError(t, testpool.InstallDaemon("../..", os.Getenv(sandbox.BinEnv("pool-managerd")), dir))
	for _, id := range []string{"llama-8b", "qwen"} {
		waitProp(t, id, "Ready", "b true")
	}
	return dir
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// prop reads a pool's property with busctl, as an operator would.
func prop(id, name string) string {
	out, _ := exec.Command("busctl", "get-property", busName, string(ifaces.PoolPath(id)), poolIface, name).CombinedOutput()
	return strings.TrimSpace(string(out))
}

func waitProp(t *testing.T, id, name, want string) {
	t.Helper()
	require.Eventually(t, func() bool { return prop(id, name) == want }, 60*time.Second, 50*time.Millisecond,
		"pool %s: %s is %q, not %q", id, name, prop(id, name), want)
}

// result is one run of poolctl.
type result struct {
	stdout, stderr string
	code           int
}

// poolctl runs the poolctl binary, as root or, with user set, as that
// user with their own groups only.
func poolctl(t *testing.T, user string, args ...string) result {
	t.Helper()
	sandbox.Need(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	bin := os.Getenv(sandbox.BinEnv("poolctl"))
	require.NotEmpty(t, bin, "poolctl was not built for this sandbox")
	var cmd *exec.Cmd
	if user == "" {
		cmd = exec.CommandContext(ctx, bin, args...)
	} else {
		cmd = exec.CommandContext(ctx, "setpriv", append([]string{"--reuid=" + user, "--regid=" + user, "--init-groups", bin}, args...)...)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		require.NoError(t, err)
	}
	return result{stdout.String(), stderr.String(), cmd.ProcessState.ExitCode()}
}

// inTerminal runs poolctl with a pseudo-terminal as its stdout, stdin and
// stderr, and returns what the terminal received.
func inTerminal(t *testing.T, args ...string) (string, int) {
	t.Helper()
	ptmx, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	require.NoError(t, err)
	defer ptmx.Close()
	require.NoError(t, unix.IoctlSetPointerInt(int(ptmx.Fd()), unix.TIOCSPTLCK, 0))
	n, err := unix.IoctlGetInt(int(ptmx.Fd()), unix.TIOCGPTN)
	require.NoError(t, err)
	pts, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY, 0)
	require.NoError(t, err)
	require.NoError(t, unix.IoctlSetWinsize(int(pts.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: 24, Col: 120}))

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Getenv(sandbox.BinEnv("poolctl")), args...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = pts, pts, pts
	cmd.Env = append(os.Environ(), "TERM=xterm-256color", "NO_COLOR=")
	require.NoError(t, cmd.Start())
	pts.Close()
	var out bytes.Buffer
	read := make(chan struct{})
	go func() {
		// EIO once the last holder of the terminal is gone.
		io.Copy(&out, ptmx)
		close(read)
	}()
	err = cmd.Wait()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		require.NoError(t, err)
	}
	select {
	case <-read:
	case <-time.After(10 * time.Second):
		t.Fatal("the terminal did not close")
	}
	return out.String(), cmd.ProcessState.ExitCode()
}

// bigModel writes a sparse model of 3 GiB, hashed for seconds while its
// reload stages it.
func bigModel(t *testing.T, dir, name string) {
	t.Helper()
	f, err := os.Create(filepath.Join(dir, "models", name))
	require.NoError(t, err)
	_, err = f.WriteString("GGUF\x03\x00\x00\x00 " + name)
	require.NoError(t, err)
	require.NoError(t, f.Truncate(3<<30))
	require.NoError(t, f.Close())
}
