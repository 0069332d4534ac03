package sandbox

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// InsideEnv is set in the environment of a test binary re-executed inside
// a sandbox.
const InsideEnv = "POOL_MANAGERD_IN_SANDBOX"

// Inside reports whether this process runs inside a sandbox.
func Inside() bool { return os.Getenv(InsideEnv) == "1" }

// Main is a TestMain for packages whose tests need a real systemd: outside
// a sandbox it boots one (one per package), runs this same test binary
// inside it with the same arguments, and tears it down; inside it runs the
// tests. setup, when set, runs outside before the boot and returns extra
// environment for the tests, directories to bind into the sandbox, and a
// cleanup run after the teardown.
// Without root nothing is booted and the tests run in place: those that
// need the sandbox skip themselves (Need), the others run.
func Main(m *testing.M, o Options, setup func() (env, binds []string, cleanup func(), err error)) int {
	if node := os.Getenv(holdNodeEnv); node != "" {
		return holdNode(node)
	}
	if Inside() || os.Geteuid() != 0 {
		return m.Run()
	}
	exe, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	wd, _ := os.Getwd()
	var env []string
	if setup != nil {
		e, binds, cleanup, err := setup()
		if cleanup != nil {
			defer cleanup()
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "sandbox setup:", err)
			return 1
		}
		env = e
		o.Binds = append(o.Binds, binds...)
	}
	o.Binds = append(o.Binds, filepath.Dir(exe))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	s, err := Boot(ctx, o)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer s.Close()
	// A race-detector build sleeps a second at exit; the shims re-executed
	// from the test binary would make every engine stop that much slower.
	cmd := s.CommandIn(ctx, wd, "env", append(append([]string{InsideEnv + "=1", "SANDBOX_TAG=" + s.Tag, "GORACE=atexit_sleep_ms=0"}, env...), append([]string{exe}, os.Args[1:]...)...)...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	err = cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// TB is what Need uses of a test; its Skip must end the test, as
// testing.TB's does.
type TB interface {
	Helper()
	Fatal(args ...any)
	Skip(args ...any)
}

// Need ends a test that needs the sandbox when it runs outside one, as it
// does without root: loudly skipped, or failed with CI set, where a skipped
// sandbox test would hide that CI lost its root.
func Need(t TB) {
	t.Helper()
	if Inside() {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatal("this test boots a real systemd in a namespace and needs root, and CI is set")
	}
	t.Skip("*** SKIPPED: this test boots a real systemd in a namespace and needs root ***")
}

// Build returns a Main setup that builds the given main packages outside
// the sandbox into a directory the sandbox sees (and the engine user can
// read), and passes each binary's path to the tests in the environment as
// SANDBOX_BIN_<NAME>, e.g. SANDBOX_BIN_POOL_ENGINE_SIM.
func Build(pkgs ...string) func() ([]string, []string, func(), error) {
	return func() ([]string, []string, func(), error) {
		dir, err := os.MkdirTemp("", "sandbox-bin-")
		if err != nil {
			return nil, nil, nil, err
		}
		cleanup := func() { os.RemoveAll(dir) }
		if err := os.Chmod(dir, 0o755); err != nil {
			return nil, nil, cleanup, err
		}
		var env []string
		for _, p := range pkgs {
			out, err := exec.Command("go", "build", "-o", dir, p).CombinedOutput()
			if err != nil {
				return nil, nil, cleanup, fmt.Errorf("building %s: %v: %s", p, err, out)
			}
			name := filepath.Base(p)
			env = append(env, BinEnv(name)+"="+filepath.Join(dir, name))
		}
		return env, []string{dir}, cleanup, nil
	}
}

// BinEnv is the environment variable Build sets for a binary.
func BinEnv(name string) string {
	return "SANDBOX_BIN_" + strings.ToUpper(strings.ReplaceAll(name, "-", "_"))
}

// GPUNodes are the device nodes of n fake NVIDIA GPUs and the control
// device.
func GPUNodes(n int) []Node {
	nodes := []Node{{"/dev/nvidiactl", 195, 255}}
	for i := range n {
		nodes = append(nodes, Node{fmt.Sprintf("/dev/nvidia%d", i), 195, uint32(i)})
	}
	return nodes
}

// RunSelf is Main for programs (make bench, make soak): it builds pkgs as
// Build does, boots a sandbox, runs this same executable with the same
// arguments inside it (where Inside reports true) with its stdout going to
// stdout, and tears down.
func RunSelf(ctx context.Context, o Options, stdout io.Writer, pkgs ...string) error {
	env, binds, cleanup, err := Build(pkgs...)()
	if cleanup != nil {
		defer cleanup()
	}
	if err != nil {
		return err
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	o.Binds = append(append(o.Binds, binds...), filepath.Dir(exe))
	s, err := Boot(ctx, o)
	if err != nil {
		return err
	}
	defer s.Close()
	wd, _ := os.Getwd()
	cmd := s.CommandIn(ctx, wd, "env", append(append(append([]string{InsideEnv + "=1"}, env...), exe), os.Args[1:]...)...)
	cmd.Stdout, cmd.Stderr = stdout, os.Stderr
	return cmd.Run()
}

// holdNodeEnv makes a test binary a process that holds a device node open
// (O_PATH: a fake node has no driver behind it) until it is killed.
const holdNodeEnv = "POOL_SANDBOX_HOLD_NODE"

func holdNode(node string) int {
	if _, err := unix.Open(node, unix.O_PATH, 0); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("holding")
	time.Sleep(10 * time.Minute)
	return 0
}

// HoldNode starts a process (this test binary) that holds node open, in
// the caller's cgroup, as another user's GPU job would; it returns once
// the node is held. The process is killed when the test ends.
func HoldNode(t interface {
	Helper()
	Cleanup(func())
	Fatalf(format string, args ...any)
}, node string) *exec.Cmd {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatalf("%v", err)
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), holdNodeEnv+"="+node)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatalf("%v", err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	buf := make([]byte, 16)
	n, _ := out.Read(buf)
	if string(buf[:n]) != "holding\n" {
		t.Fatalf("the node holder did not hold %s: %q", node, buf[:n])
	}
	return cmd
}
