package sockdiag

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// ErrNoPeer means the kernel knows no socket at the other end of a
// connection: not a local one, or one whose handshake the other side has
// not finished yet.
var ErrNoPeer = errors.New("no local peer socket")

// Conn is a NETLINK_SOCK_DIAG socket kept for repeated lookups (one per
// engine run): a lookup is then one request and one answer, with no
// socket made and no dump of every listener.
type Conn struct {
	mu  sync.Mutex
	fd  int
	seq uint32
	buf []byte
}

// Open makes a Conn.
func Open() (*Conn, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("sockdiag: netlink socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("sockdiag: netlink bind: %w", err)
	}
	tv := unix.NsecToTimeval((5 * time.Second).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("sockdiag: netlink timeout: %w", err)
	}
	return &Conn{fd: fd, buf: make([]byte, 8<<10)}, nil
}

// Close closes the socket.
func (c *Conn) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fd >= 0 {
		unix.Close(c.fd)
		c.fd = -1
	}
}

// peerRequest encodes a lookup of the one TCP socket of family bound to
// src and connected to dst (no dump: the kernel answers with it or with
// ENOENT).
func peerRequest(family uint8, src, dst netip.AddrPort, seq uint32) []byte {
	b := make([]byte, unix.SizeofNlMsghdr+sizeofReq)
	ne := binary.NativeEndian
	ne.PutUint32(b[0:], uint32(len(b)))
	ne.PutUint16(b[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint16(b[6:], unix.NLM_F_REQUEST)
	ne.PutUint32(b[8:], seq)
	r := b[unix.SizeofNlMsghdr:]
	r[0] = family
	r[1] = unix.IPPROTO_TCP
	ne.PutUint32(r[4:], ^uint32(0))
	// struct inet_diag_sockid: ports and addresses in network order.
	binary.BigEndian.PutUint16(r[8:], src.Port())
	binary.BigEndian.PutUint16(r[10:], dst.Port())
	putAddr(r[12:28], family, src.Addr())
	putAddr(r[28:44], family, dst.Addr())
	ne.PutUint32(r[48:], ^uint32(0))
	ne.PutUint32(r[52:], ^uint32(0))
	return b
}

func putAddr(b []byte, family uint8, a netip.Addr) {
	if family == unix.AF_INET {
		v4 := a.Unmap().As4()
		copy(b, v4[:])
		return
	}
	v6 := a.As16()
	copy(b, v6[:])
}

// Peer returns the socket at the other end of this host's TCP connection
// from local to remote: the one bound to remote and connected to local
// (on the engine's side, the socket its listener accepted, which the
// kernel made in the listener's cgroup). An IPv4 connection may have an
// IPv6 socket (v4-mapped) at its other end; both are asked.
func (c *Conn) Peer(local, remote netip.AddrPort) (Owner, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fd < 0 {
		return Owner{}, errors.New("sockdiag: lookup on a closed socket")
	}
	families := []uint8{unix.AF_INET6}
	if remote.Addr().Unmap().Is4() {
		families = []uint8{unix.AF_INET, unix.AF_INET6}
	}
	for _, f := range families {
		r, l := remote, local
		if f == unix.AF_INET6 && remote.Addr().Unmap().Is4() {
			r = netip.AddrPortFrom(netip.AddrFrom16(remote.Addr().Unmap().As16()), remote.Port())
			l = netip.AddrPortFrom(netip.AddrFrom16(local.Addr().Unmap().As16()), local.Port())
		}
		o, err := c.lookup(f, r, l)
		if errors.Is(err, unix.ENOENT) {
			continue
		}
		if err != nil {
			return Owner{}, err
		}
		return o, nil
	}
	return Owner{}, fmt.Errorf("sockdiag: %s to %s: %w", local, remote, ErrNoPeer)
}

func (c *Conn) lookup(family uint8, src, dst netip.AddrPort) (Owner, error) {
	c.seq++
	seq := c.seq
	if err := unix.Sendto(c.fd, peerRequest(family, src, dst, seq), 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return Owner{}, fmt.Errorf("sockdiag: netlink send: %w", err)
	}
	for {
		n, _, flags, from, err := unix.Recvmsg(c.fd, c.buf, nil, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return Owner{}, fmt.Errorf("sockdiag: netlink receive: %w", err)
		}
		if sa, ok := from.(*unix.SockaddrNetlink); !ok || sa.Pid != 0 {
			continue
		}
		if flags&unix.MSG_TRUNC != 0 {
			return Owner{}, errors.New("sockdiag: netlink message truncated")
		}
		owners, err := parseMessages(c.buf[:n], seq, nil)
		if err != nil && err != errDone {
			return Owner{}, err
		}
		if len(owners) > 0 {
			return owners[0], nil
		}
		if err == errDone {
			return Owner{}, unix.ENOENT
		}
		// An answer to an earlier, abandoned request: read on.
	}
}

// CheckPeer returns nil when the socket at the other end of the
// connection from local to remote belongs to the scope (by cgroup, or by
// uid where cgroups cannot tell, as CheckOwner decides). Where the kernel
// has no such socket yet (see ErrNoPeer) it checks the listeners on
// remote instead, as CheckOwner. A *ForeignError names a socket outside.
func (c *Conn) CheckPeer(local, remote netip.AddrPort, s Scope) (Method, error) {
	o, err := c.Peer(local, remote)
	if errors.Is(err, ErrNoPeer) {
		return CheckOwner(remote.Addr(), remote.Port(), s)
	}
	if err != nil {
		return 0, err
	}
	hf := hostFacts()
	m, why := method([]Owner{o}, s, hf)
	if m == ByCgroup && (o.CgroupID == s.CgroupID || beneath(o.CgroupID, s, hf)) || m == ByUID && o.UID == s.UID {
		return m, nil
	}
	f := &ForeignError{Addr: remote.Addr(), Port: remote.Port(), Scope: s, Owner: o, Method: m, Why: why}
	f.fill()
	return m, f
}

// Squatter returns the first listener on port (on any address) that the
// scope does not own, decided as CheckOwner decides, as a *ForeignError
// with its cgroup and processes filled in where they can be found; nil
// when every listener on port is the scope's or none listens.
func Squatter(port uint16, s Scope) (*ForeignError, error) {
	owners, err := ListenerOwners(netip.Addr{}, port)
	if err != nil {
		return nil, err
	}
	_, err = check(owners, netip.Addr{}, port, s, hostFacts())
	var f *ForeignError
	if errors.As(err, &f) {
		f.Addr = f.Owner.Addr.Addr()
		f.fill()
		return f, nil
	}
	return nil, nil
}

// maxPIDs bounds the processes a ForeignError names.
const maxPIDs = 4

// fill finds, best effort, the path of the foreign socket's cgroup and
// the processes in it (cgroup.procs is readable by everyone): what the
// operator needs to find the squatter.
func (e *ForeignError) fill() {
	if e.Owner.CgroupID == 0 || e.Method != ByCgroup {
		return
	}
	p, err := CgroupPathOfID(e.Owner.CgroupID)
	if err != nil {
		return
	}
	e.OwnerCgroup = p
	dir, err := cgroupDir(p)
	if err != nil {
		return
	}
	e.PIDs, e.MorePIDs = cgroupPIDs(path.Join(dir, "cgroup.procs"))
}

// cgroupPIDs reads at most maxPIDs pids from a cgroup.procs, and whether
// there are more.
func cgroupPIDs(file string) ([]int, bool) {
	f, err := os.Open(file)
	if err != nil {
		return nil, false
	}
	defer f.Close()
	b, _ := io.ReadAll(io.LimitReader(f, 4<<10))
	var pids []int
	for line := range bytes.Lines(b) {
		pid, err := strconv.Atoi(string(bytes.TrimSpace(line)))
		if err != nil || pid <= 0 {
			continue
		}
		if len(pids) == maxPIDs {
			return pids, true
		}
		pids = append(pids, pid)
	}
	return pids, false
}
