package sockdiag

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
)

// listenEnv makes the test binary a listener: "NETWORK ADDRESS", e.g.
// "tcp4 127.0.0.1:0", or "none" to listen nowhere. It prints its port and
// holds the socket until its stdin closes.
const listenEnv = "SOCKDIAG_TEST_LISTEN"

const (
	engineUser   = "sd-engine"
	squatterUser = "sd-squatter"
)

func TestMain(m *testing.M) {
	if spec := os.Getenv(listenEnv); spec != "" {
		os.Exit(listenMain(spec))
	}
	os.Exit(sandbox.Main(m, sandbox.Options{Prepare: [][]string{
		{"useradd", "--system", "--no-create-home", engineUser},
		{"useradd", "--system", "--no-create-home", squatterUser},
	}}, nil))
}

func listenMain(spec string) int {
	port := 0
	if spec != "none" {
		network, addr, _ := strings.Cut(spec, " ")
		l, err := net.Listen(network, addr)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer l.Close()
		port = l.Addr().(*net.TCPAddr).Port
	}
	fmt.Println(port)
	io.Copy(io.Discard, os.Stdin)
	return 0
}

// A copy of this binary that the test users may run (the build directory
// is root's alone).
var listenerExe = sync.OnceValues(func() (string, error) {
	exe, err := os.Executable()
	if err != nil {
		return "", err
	}
	dir, err := os.MkdirTemp("", "sockdiag-")
	if err != nil {
		return "", err
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return "", err
	}
	b, err := os.ReadFile(exe)
	if err != nil {
		return "", err
	}
	dst := filepath.Join(dir, "listener")
	return dst, os.WriteFile(dst, b, 0o755)
})

type proc struct {
	pid  int
	port uint16
	unit string
}

var units atomic.Int32

// start runs a listener as user, in a new scope of its own when inScope,
// else as a plain child of the test (in the test's cgroup). It is stopped
// when the test ends, also on failure.
func start(t *testing.T, ctx context.Context, user string, inScope bool, spec string) proc {
	t.Helper()
	exe, err := listenerExe()
	require.NoError(t, err)
	var p proc
	var cmd *exec.Cmd
	if inScope {
		p.unit = fmt.Sprintf("sockdiag-test-%d-%d.scope", os.Getpid(), units.Add(1))
		cmd = exec.CommandContext(ctx, "systemd-run", "--scope", "--quiet", "--unit="+p.unit, "--uid="+user, "--gid="+user,
			"--", "env", listenEnv+"="+spec, exe)
	} else {
		cmd = exec.CommandContext(ctx, "setpriv", "--reuid="+user, "--regid="+user, "--clear-groups",
			"--", "env", listenEnv+"="+spec, exe)
	}
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		stdin.Close()
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		if p.unit != "" {
			exec.Command("systemctl", "stop", p.unit).Run()
		}
	})
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(stdout).ReadString('\n')
		line <- s
	}()
	select {
	case s := <-line:
		n, err := strconv.ParseUint(strings.TrimSpace(s), 10, 16)
		require.NoError(t, err, "the listener %q started", spec)
		p.port = uint16(n)
	case <-time.After(20 * time.Second):
		t.Fatalf("the listener %q did not start", spec)
	}
	p.pid = cmd.Process.Pid // systemd-run --scope, env and setpriv exec
	return p
}

func uidOf(t *testing.T, name string) uint32 {
	u, err := user.Lookup(name)
	require.NoError(t, err)
	n, err := strconv.ParseUint(u.Uid, 10, 32)
	require.NoError(t, err)
	return uint32(n)
}

// The id of a scope's cgroup is the same whether read from a process in
// it or from systemd's ControlGroup property, and it is the id the kernel
// reports for the sockets made there.
func TestScopeCgroupIDFromPidAndFromSystemd(t *testing.T) {
	sandbox.Need(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	e := start(t, ctx, engineUser, true, "tcp4 127.0.0.1:0")
	byPid, err := CgroupID(e.pid)
	require.NoError(t, err)
	out, err := exec.Command("systemctl", "show", "-P", "ControlGroup", e.unit).Output()
	require.NoError(t, err)
	cg := strings.TrimSpace(string(out))
	require.True(t, strings.HasSuffix(cg, "/"+e.unit), "ControlGroup=%s", cg)
	byPath, err := CgroupIDOfPath(cg)
	require.NoError(t, err)
	assert.Equal(t, byPath, byPid)
	self, err := CgroupID(os.Getpid())
	require.NoError(t, err)
	assert.NotEqual(t, self, byPid, "the scope is a cgroup of its own")

	owners, err := ListenerOwners(netip.MustParseAddr("127.0.0.1"), e.port)
	require.NoError(t, err)
	require.Len(t, owners, 1)
	assert.Equal(t, byPid, owners[0].CgroupID)
	assert.Equal(t, uidOf(t, engineUser), owners[0].UID)
}

// Only a listener made in the engine's scope passes: a squatter of
// another user (in a scope of its own or none), or of the engine's own
// user outside the scope, is refused by name, on 127.0.0.1, 0.0.0.0 and a
// dual-stack ::; a v6-only squatter beside the engine spoils only IPv6.
func TestOnlyTheScopesListenerPasses(t *testing.T) {
	sandbox.Need(t)
	engineUID, squatterUID := uidOf(t, engineUser), uidOf(t, squatterUser)
	type who struct {
		user    string
		inScope bool
		spec    string
	}
	type probe struct {
		addr    string
		foreign uint32 // the uid named in the refusal; 0: passes
	}
	for _, c := range []struct {
		name     string
		engine   string // the engine's listen spec, "none" when it has not bound yet
		squatter *who   // listens on the engine's port when it has one, else on a new one
		probes   []probe
	}{
		{name: "the engine on 127.0.0.1", engine: "tcp4 127.0.0.1:0", probes: []probe{{"127.0.0.1", 0}}},
		{name: "the engine on 0.0.0.0", engine: "tcp4 0.0.0.0:0", probes: []probe{{"127.0.0.1", 0}}},
		{name: "the engine on a dual-stack ::", engine: "tcp [::]:0", probes: []probe{{"127.0.0.1", 0}, {"::1", 0}}},
		{name: "another user's squatter in a scope on 127.0.0.1", engine: "none",
			squatter: &who{squatterUser, true, "tcp4 127.0.0.1:0"}, probes: []probe{{"127.0.0.1", squatterUID}}},
		{name: "another user's squatter on 0.0.0.0", engine: "none",
			squatter: &who{squatterUser, false, "tcp4 0.0.0.0:0"}, probes: []probe{{"127.0.0.1", squatterUID}}},
		{name: "another user's squatter on a dual-stack ::", engine: "none",
			squatter: &who{squatterUser, false, "tcp [::]:0"}, probes: []probe{{"127.0.0.1", squatterUID}, {"::1", squatterUID}}},
		{name: "the engine's user outside the scope", engine: "none",
			squatter: &who{engineUser, false, "tcp4 127.0.0.1:0"}, probes: []probe{{"127.0.0.1", engineUID}}},
		{name: "a v6-only squatter beside the engine on 0.0.0.0", engine: "tcp4 0.0.0.0:0",
			squatter: &who{squatterUser, true, "tcp6 [::]:%d"}, probes: []probe{{"127.0.0.1", 0}, {"::1", squatterUID}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			e := start(t, ctx, engineUser, true, c.engine)
			id, err := CgroupID(e.pid)
			require.NoError(t, err)
			scope := Scope{Unit: e.unit, CgroupID: id, UID: engineUID}
			port := e.port
			if c.squatter != nil {
				spec := c.squatter.spec
				if strings.Contains(spec, "%d") {
					spec = fmt.Sprintf(spec, port)
				}
				s := start(t, ctx, c.squatter.user, c.squatter.inScope, spec)
				port = s.port
			}
			for _, p := range c.probes {
				m, err := CheckOwner(netip.MustParseAddr(p.addr), port, scope)
				assert.Equal(t, ByCgroup, m, "this kernel gives socket cgroups")
				if p.foreign == 0 {
					assert.NoError(t, err, p.addr)
					continue
				}
				var fe *ForeignError
				require.True(t, errors.As(err, &fe), "%s refused: %v", p.addr, err)
				assert.Contains(t, err.Error(), fmt.Sprintf("port %d on %s is held by a socket of uid %d outside %s", port, p.addr, p.foreign, e.unit))
				assert.NotZero(t, fe.Owner.Inode)
				assert.NotEqual(t, id, fe.Owner.CgroupID)
			}
		})
	}
}
