package sockdiag

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// These run as any user, in or outside a sandbox: the test process's own
// listeners, its own uid and cgroup.

func listen(t *testing.T, network, addr string) (netip.AddrPort, uint32) {
	t.Helper()
	l, err := net.Listen(network, addr)
	if err != nil && network != "tcp4" {
		t.Skipf("no IPv6 here: %v", err)
	}
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	rc, err := l.(*net.TCPListener).SyscallConn()
	require.NoError(t, err)
	var st unix.Stat_t
	require.NoError(t, rc.Control(func(fd uintptr) { err = unix.Fstat(int(fd), &st) }))
	require.NoError(t, err)
	return l.Addr().(*net.TCPAddr).AddrPort(), uint32(st.Ino)
}

func ownScope(t *testing.T) Scope {
	id, err := CgroupID(os.Getpid())
	if errors.Is(err, ErrNoCgroup2) {
		id = 0
	} else {
		require.NoError(t, err)
	}
	return Scope{Unit: "this-test.scope", CgroupID: id, UID: uint32(os.Getuid())}
}

// The kernel reports this process's listener with its address, inode,
// uid and cgroup, and the check passes for its own scope.
func TestOwnListenerBelongsToOwnScope(t *testing.T) {
	ap, inode := listen(t, "tcp4", "127.0.0.1:0")
	s := ownScope(t)
	owners, err := ListenerOwners(ap.Addr(), ap.Port())
	require.NoError(t, err)
	require.Len(t, owners, 1)
	assert.Equal(t, Owner{Addr: ap, UID: s.UID, Inode: inode, CgroupID: s.CgroupID}, owners[0])

	m, err := CheckOwner(netip.MustParseAddr("127.0.0.1"), ap.Port(), s)
	assert.NoError(t, err)
	if s.CgroupID != 0 {
		assert.Equal(t, ByCgroup, m, "this kernel gives socket cgroups")
	}
}

// The same listener seen from another cgroup is foreign, and the error
// names it; once it is closed nothing listens.
func TestOwnListenerIsForeignToAnotherScope(t *testing.T) {
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	port := l.Addr().(*net.TCPAddr).AddrPort().Port()
	s := ownScope(t)
	if s.CgroupID == 0 {
		t.Skip("no cgroup v2 hierarchy on this host")
	}
	other := Scope{Unit: "pool-engine-other.scope", CgroupID: s.CgroupID + 1000, UID: s.UID}
	m, err := CheckOwner(netip.MustParseAddr("127.0.0.1"), port, other)
	var fe *ForeignError
	require.True(t, errors.As(err, &fe), "refused: %v", err)
	assert.Equal(t, ByCgroup, m)
	assert.Equal(t, s.CgroupID, fe.Owner.CgroupID)
	assert.Contains(t, err.Error(), "outside pool-engine-other.scope")

	require.NoError(t, l.Close())
	_, err = CheckOwner(netip.MustParseAddr("127.0.0.1"), port, s)
	assert.ErrorIs(t, err, ErrNoListener)
}

// A dual-stack :: listener takes IPv4 and IPv6 probes, a v6-only one only
// IPv6.
func TestDualStackAndV6OnlyListeners(t *testing.T) {
	dual, _ := listen(t, "tcp", "[::]:0")
	v6only, _ := listen(t, "tcp6", "[::]:0")
	s := ownScope(t)
	for _, c := range []struct {
		probe string
		port  uint16
		found bool
	}{
		{"127.0.0.1", dual.Port(), true},
		{"::1", dual.Port(), true},
		{"127.0.0.1", v6only.Port(), false},
		{"::1", v6only.Port(), true},
	} {
		owners, err := ListenerOwners(netip.MustParseAddr(c.probe), c.port)
		require.NoError(t, err)
		if !c.found {
			assert.Empty(t, owners, "%s:%d", c.probe, c.port)
			continue
		}
		require.Len(t, owners, 1, "%s:%d", c.probe, c.port)
		assert.Equal(t, c.port == v6only.Port(), owners[0].V6Only)
		_, err = CheckOwner(netip.MustParseAddr(c.probe), c.port, s)
		assert.NoError(t, err)
	}
}

// The kernel sends only the listeners on the asked port.
func TestDumpOfOnePort(t *testing.T) {
	ap, _ := listen(t, "tcp4", "127.0.0.1:0")
	other, _ := listen(t, "tcp4", "127.0.0.1:0")
	owners, err := dump(1<<tcpListen, ap.Port())
	require.NoError(t, err)
	require.Len(t, owners, 1)
	assert.Equal(t, ap, owners[0].Addr)
	all, err := dump(1<<tcpListen, 0)
	require.NoError(t, err)
	var ports []uint16
	for _, o := range all {
		ports = append(ports, o.Addr.Port())
	}
	assert.Contains(t, ports, ap.Port())
	assert.Contains(t, ports, other.Port())
}

// One check is two netlink dumps of the host's listeners; its cost grows
// with their number.
func BenchmarkCheckOwner(b *testing.B) {
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	require.NoError(b, err)
	defer l.Close()
	port := l.Addr().(*net.TCPAddr).AddrPort().Port()
	id, _ := CgroupID(os.Getpid())
	s := Scope{CgroupID: id, UID: uint32(os.Getuid())}
	addr := netip.MustParseAddr("127.0.0.1")
	for _, extra := range []int{0, 500} {
		b.Run(fmt.Sprintf("other-listeners=%d", extra), func(b *testing.B) {
			for range extra {
				o, err := net.Listen("tcp4", "127.0.0.1:0")
				require.NoError(b, err)
				defer o.Close()
			}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := CheckOwner(addr, port, s); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkCgroupID(b *testing.B) {
	pid := os.Getpid()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := CgroupID(pid); err != nil {
			b.Fatal(err)
		}
	}
}

// Where a foreign listener lives is named by its cgroup's path, found from
// the socket's cgroup id (opening a cgroup by handle needs
// CAP_DAC_READ_SEARCH: root).
func TestAForeignListenersCgroupIsNamed(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("opening a cgroup by its id needs CAP_DAC_READ_SEARCH (root)")
	}
	ap, _ := listen(t, "tcp4", "127.0.0.1:0")
	s := ownScope(t)
	if s.CgroupID == 0 {
		t.Skip("no cgroup v2 hierarchy on this host")
	}
	own, err := os.ReadFile("/proc/self/cgroup")
	require.NoError(t, err)
	var want string
	for line := range strings.Lines(string(own)) {
		if p, ok := strings.CutPrefix(strings.TrimSpace(line), "0::"); ok {
			want = p
		}
	}
	got, err := CgroupPathOfID(s.CgroupID)
	require.NoError(t, err)
	assert.Equal(t, want, got)
	other := Scope{Unit: "pool-engine-other.scope", CgroupID: s.CgroupID + 1000, UID: s.UID}
	_, err = CheckOwner(ap.Addr(), ap.Port(), other)
	var fe *ForeignError
	require.True(t, errors.As(err, &fe), "refused: %v", err)
	assert.Equal(t, want, fe.OwnerCgroup)
	assert.Contains(t, err.Error(), "in cgroup "+want)
}
