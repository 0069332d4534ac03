// Package sandbox boots a real systemd and system bus for tests, as PID 1 of
// a private PID and mount namespace on a copy-on-write view of the host's
// root with a /dev of its own, so that units, users, files and fake GPU
// device nodes made by a test never touch the machine. It always tears
// down: on Close, on a signal, and (through the kernel) when the test
// process dies.
package sandbox

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Node is a device node created in the sandbox's /dev.
type Node struct {
	Path         string
	Major, Minor uint32
}

// FakeGPUs are the device nodes of two NVIDIA GPUs and the control device
// (major 195), as the driver would create them.
var FakeGPUs = []Node{
	{"/dev/nvidia0", 195, 0},
	{"/dev/nvidia1", 195, 1},
	{"/dev/nvidiactl", 195, 255},
}

// Options configure a sandbox.
type Options struct {
	// Binds are host directories made visible at the same path inside
	// (the sandbox has its own /tmp and /run).
	Binds []string
	// Nodes are created in the sandbox's /dev.
	Nodes []Node
	// Units are started once the system is up (dbus is always started).
	Units []string
	// Prepare are commands run inside once it is up, e.g. a useradd.
	Prepare [][]string
	// Layer is a directory laid over the host's root, for a host without
	// systemd (a GPU machine's container image): its files win. Empty
	// means $POOL_SANDBOX_LAYER, and none when that is unset.
	Layer string
}

// LayerEnv names the default Options.Layer.
const LayerEnv = "POOL_SANDBOX_LAYER"

// Sandbox is one booted systemd.
type Sandbox struct {
	// Tag identifies this sandbox; it is also systemd's container= value.
	Tag string
	// PID is systemd's PID on the host.
	PID  int
	dir  string
	cmd  *exec.Cmd
	done chan struct{}
}

const script = `set -e
R=%[1]s
read -r hostpid _ < /proc/self/stat; echo $hostpid > $R.pid
mkdir -p $R && mount -t tmpfs -o size=4g tmpfs $R && mkdir -p $R/upper $R/work $R/root
%[5]s
mount -t overlay overlay -o lowerdir=$lower/,upperdir=$R/upper,workdir=$R/work $R/root
# A container image's policy-rc.d (exit 101) keeps packages from starting
# their services; the host a sandbox plays has none. The host keeps its own.
rm -f $R/root/usr/sbin/policy-rc.d
mount -t tmpfs -o mode=755,nosuid tmpfs $R/root/dev
for n in null zero full random urandom tty console kmsg ptmx; do cp -a /dev/$n $R/root/dev/; done
mkdir -p $R/root/dev/pts $R/root/dev/shm $R/root/dev/mqueue
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/root/dev/pts
mount -t tmpfs -o nosuid,nodev tmpfs $R/root/dev/shm
ln -s /proc/self/fd $R/root/dev/fd
%[2]s
mount --rbind /sys $R/root/sys
mount -t proc proc $R/root/proc
mount -t tmpfs tmpfs $R/root/run; mount -t tmpfs tmpfs $R/root/tmp
%[3]s
# A cgroup of its own: systemd takes the one it starts in as its root, and
# sandboxes side by side must not share /system.slice and its units.
# Every hierarchy: systemd uses a v1 controller only where its root exists.
# With cgroup v2 alone there is one, at the top.
hs="/sys/fs/cgroup /sys/fs/cgroup/*"
[ "$(stat -fc %%T /sys/fs/cgroup)" != cgroup2fs ] || hs=/sys/fs/cgroup
for h in $hs; do
  [ -e $h/cgroup.procs ] && [ ! -L $h ] || continue
  mkdir -p $h/%[4]s || continue
  for f in cpuset.cpus cpuset.mems; do [ ! -e $h/$f ] || cat $h/$f > $h/%[4]s/$f || true; done
  echo 0 > $h/%[4]s/cgroup.procs || true
done
cd $R/root && exec chroot . env container=%[4]s /lib/systemd/systemd --system --unit=basic.target --log-target=journal
`

// Boot starts a sandbox and waits until its systemd is running and its
// system bus is up.
func Boot(ctx context.Context, o Options) (*Sandbox, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("sandbox: booting systemd in a namespace needs root")
	}
	tag := fmt.Sprintf("pool-managerd-test-%d-%d", os.Getpid(), time.Now().UnixNano()%1e6)
	dir := filepath.Join(os.TempDir(), "sb-"+tag)
	var nodes, binds strings.Builder
	for _, n := range o.Nodes {
		fmt.Fprintf(&nodes, "mknod -m 666 $R/root%s c %d %d\n", n.Path, n.Major, n.Minor)
	}
	lower := "lower="
	if o.Layer == "" {
		o.Layer = os.Getenv(LayerEnv)
	}
	if o.Layer != "" {
		// overlayfs takes ':' and ',' as separators in lowerdir.
		if strings.ContainsAny(o.Layer, ":,") || !filepath.IsAbs(o.Layer) {
			return nil, fmt.Errorf("sandbox: layer %q: not an absolute path without ':' or ','", o.Layer)
		}
		// A layer on the root's own file system overlaps it: a copy on
		// the sandbox's tmpfs does not.
		lower = fmt.Sprintf("cp -a %s/. $R/layer\nlower=$R/layer:", shellQuote(o.Layer))
	}
	for _, b := range o.Binds {
		fmt.Fprintf(&binds, "mkdir -p $R/root%[1]s && mount --bind %[1]s $R/root%[1]s\n", shellQuote(b))
	}
	cmd := exec.Command("unshare", "--pid", "--fork", "--mount", "--propagation", "private", "--kill-child",
		"bash", "-c", fmt.Sprintf(script, dir, nodes.String(), binds.String(), tag, lower))
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	// The namespace dies with us: unshare gets SIGKILL when the test
	// process goes, and --kill-child takes systemd (PID 1 there) with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	s := &Sandbox{Tag: tag, dir: dir, cmd: cmd, done: make(chan struct{})}
	go func() { cmd.Wait(); close(s.done) }()
	if err := s.waitUp(ctx, &out, o.Units, o.Prepare); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

func (s *Sandbox) waitUp(ctx context.Context, out *bytes.Buffer, units []string, prepare [][]string) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	for s.PID == 0 {
		if b, err := os.ReadFile(s.dir + ".pid"); err == nil && len(bytes.TrimSpace(b)) > 0 {
			s.PID, _ = strconv.Atoi(string(bytes.TrimSpace(b)))
			break
		}
		select {
		case <-s.done:
			return fmt.Errorf("sandbox: setup failed: %s", out.String())
		case <-ctx.Done():
			return fmt.Errorf("sandbox: no systemd started: %w", ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
	// systemd answers once it has set up its private socket; until then
	// systemctl fails to connect.
	var last []byte
	for {
		o, err := s.Command(ctx, "systemctl", "is-system-running", "--wait").CombinedOutput()
		st := strings.TrimSpace(string(o))
		if st == "running" || st == "degraded" {
			break
		}
		last = o
		_ = err
		select {
		case <-s.done:
			return fmt.Errorf("sandbox: systemd exited: %s", out.String())
		case <-ctx.Done():
			return fmt.Errorf("sandbox: systemd not running (%s): %w", last, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
	args := append([]string{"start", "dbus.socket", "dbus.service"}, units...)
	if o, err := s.Command(ctx, "systemctl", args...).CombinedOutput(); err != nil {
		return fmt.Errorf("sandbox: systemctl start: %v: %s", err, o)
	}
	for _, c := range prepare {
		if _, err := s.Run(ctx, c[0], c[1:]...); err != nil {
			return fmt.Errorf("sandbox: %w", err)
		}
	}
	return nil
}

// Command returns a command that runs inside the sandbox: in its PID and
// mount namespaces and its root, with the given working directory (the
// sandbox's / when empty).
func (s *Sandbox) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return s.CommandIn(ctx, "", name, args...)
}

// CommandIn is Command with a working directory.
func (s *Sandbox) CommandIn(ctx context.Context, dir, name string, args ...string) *exec.Cmd {
	wd := "--wd"
	if dir != "" {
		wd = "--wd=" + dir
	}
	a := append([]string{"-t", strconv.Itoa(s.PID), "-m", "-p", "-r", wd, "--", name}, args...)
	return exec.CommandContext(ctx, "nsenter", a...)
}

// Run runs a command inside and returns its combined output.
func (s *Sandbox) Run(ctx context.Context, name string, args ...string) (string, error) {
	out, err := s.Command(ctx, name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// Close powers the sandbox off and waits until nothing of it is left; it
// kills it outright if a clean poweroff takes too long.
func (s *Sandbox) Close() error {
	if s.PID != 0 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = s.Command(ctx, "systemctl", "poweroff", "--no-block").Run()
		cancel()
	}
	select {
	case <-s.done:
	case <-time.After(20 * time.Second):
		// Killing PID 1 of a PID namespace kills every process in it.
		if s.PID != 0 {
			_ = syscall.Kill(s.PID, syscall.SIGKILL)
		}
		_ = s.cmd.Process.Kill()
		<-s.done
	}
	os.Remove(s.dir + ".pid")
	removeCgroups(s.Tag)
	// The tmpfs and overlay lived in the namespace's mount table only:
	// what is left is an empty directory.
	if err := os.Remove(s.dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("sandbox: %w", err)
	}
	return nil
}

// removeCgroups removes what is left of the sandbox's cgroups in every
// hierarchy, deepest first (a cgroup directory goes only by rmdir).
func removeCgroups(tag string) {
	tops, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", tag))
	tops = append(tops, filepath.Join("/sys/fs/cgroup", tag))
	for _, top := range tops {
		var dirs []string
		filepath.WalkDir(top, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			syscall.Rmdir(dirs[i])
		}
	}
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }
