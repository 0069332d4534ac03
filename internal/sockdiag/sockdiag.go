// Package sockdiag tells who holds a TCP port: it asks the kernel
// (NETLINK_SOCK_DIAG, which any user may) for the listening sockets and
// the cgroup each was created in, so that a pool is Ready only when the
// socket answering its health probe belongs to the pool's own scope, not
// to another user squatting the port. It needs no ptrace rights: unlike
// /proc/PID/fd, what it reads is open to every user.
package sockdiag

import (
	"errors"
	"fmt"
	"net/netip"
	"path"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// Owner is a listening TCP socket and who made it.
type Owner struct {
	// Addr is the address and port the socket is bound to.
	Addr netip.AddrPort
	// V6Only is set on an IPv6 socket that takes no IPv4 connections.
	V6Only bool
	// Interface is the index of the device the socket is bound to, or 0.
	Interface uint32
	// UID owns the socket (the creator's).
	UID uint32
	// Inode is the socket's inode, as in /proc/PID/fd/N -> socket:[Inode].
	Inode uint32
	// CgroupID is the cgroup v2 cgroup the socket was created in; 0 where
	// the kernel does not report it (Linux < 5.7).
	CgroupID uint64
}

// Scope is what the listener on an engine's port must belong to.
type Scope struct {
	// Unit names the scope in messages, e.g. pool-engine-x.scope.
	Unit string
	// CgroupID is the scope's cgroup v2 id (CgroupID, CgroupIDOfPath);
	// 0 where the host has none, which leaves the uid check.
	CgroupID uint64
	// Path is the scope's cgroup path (systemd's ControlGroup), "" if
	// unknown. Where it is known, a listener made in a cgroup beneath the
	// scope's passes too: an engine that splits its scope (podman run
	// --cgroups=split puts the container in a child cgroup). Only root
	// and the processes already in the scope can put a process there.
	Path string
	// UID is the engine's user.
	UID uint32
}

// Method says how ownership was decided.
type Method int

const (
	// ByCgroup: the socket was created in the scope's cgroup. Only root
	// (through systemd) can put a process there.
	ByCgroup Method = iota + 1
	// ByUID: socket cgroups were unavailable, so the socket's uid was
	// compared with the engine's: weaker, any process of the engine's
	// user passes.
	ByUID
)

func (m Method) String() string {
	switch m {
	case ByCgroup:
		return "cgroup"
	case ByUID:
		return "uid"
	}
	return "Method(" + strconv.Itoa(int(m)) + ")"
}

// ErrNoListener means nothing listens where the probe would connect.
var ErrNoListener = errors.New("no listener")

// ForeignError names a listener that would receive the probe's
// connection and does not belong to the scope.
type ForeignError struct {
	Addr   netip.Addr
	Port   uint16
	Scope  Scope
	Owner  Owner
	Method Method
	// Why the uid was compared instead of the cgroup (ByUID only).
	Why string
	// OwnerCgroup is the path of the listener's cgroup, where it could
	// be found ("" otherwise).
	OwnerCgroup string
	// PIDs are processes in that cgroup, the first few (MorePIDs: there
	// are more), where they could be read.
	PIDs     []int
	MorePIDs bool
}

func (e *ForeignError) Error() string {
	unit := e.Scope.Unit
	if unit == "" {
		unit = "the engine's scope"
	}
	msg := fmt.Sprintf("port %d on %s is held by a socket of uid %d outside %s (inode %d, listening on %s",
		e.Port, e.Addr, e.Owner.UID, unit, e.Owner.Inode, e.Owner.Addr)
	if e.Method == ByUID {
		return msg + fmt.Sprintf("; checked by uid, the engine's is %d, because %s)", e.Scope.UID, e.Why)
	}
	if e.OwnerCgroup == "" {
		return msg + fmt.Sprintf(", cgroup id %d, the scope's is %d)", e.Owner.CgroupID, e.Scope.CgroupID)
	}
	msg += fmt.Sprintf(", in cgroup %s", e.OwnerCgroup)
	if len(e.PIDs) > 0 {
		pids := make([]string, len(e.PIDs))
		for i, p := range e.PIDs {
			pids[i] = strconv.Itoa(p)
		}
		word := "pid"
		if len(pids) > 1 {
			word = "pids"
		}
		msg += ", " + word + " " + strings.Join(pids, ", ")
		if e.MorePIDs {
			msg += " and more"
		}
	}
	msg += ")"
	if containerized(e.OwnerCgroup) {
		msg += "; an engine started with docker run (or another container engine that keeps its containers in its own cgroups) " +
			"serves from outside the pool's scope, so the pool can never vouch for it: run the engine inside the scope, " +
			"with podman run --rm --cgroups=split or the engine's own binary in ExecStart="
	}
	return msg
}

// containerized says whether a cgroup path is a container engine's: a
// container's own scope or the daemon that forwards its published ports
// (docker-proxy runs in docker.service).
func containerized(cgroup string) bool {
	base := path.Base(cgroup)
	for _, p := range []string{"docker-", "libpod-", "crio-", "cri-containerd-"} {
		if strings.HasPrefix(base, p) && strings.HasSuffix(base, ".scope") {
			return true
		}
	}
	switch base {
	case "docker.service", "containerd.service", "crio.service", "podman.service":
		return true
	}
	return strings.HasPrefix(cgroup, "/docker/") || strings.Contains(cgroup, "/kubepods")
}

// ListenerOwners returns the listening TCP sockets that could receive a
// connection to addr:port: bound to addr itself, to the wildcard of its
// family, or (for IPv4) an IPv6 socket bound to :: or to addr v4-mapped
// that takes IPv4. An unspecified addr matches every listener on port.
// The kernel reports the sockets of the caller's network namespace.
func ListenerOwners(addr netip.Addr, port uint16) ([]Owner, error) {
	all, err := dump(1<<tcpListen, port)
	if err != nil {
		return nil, err
	}
	return receivers(all, addr, port), nil
}

// CheckOwner returns nil when every listener that could receive a
// connection to addr:port belongs to the scope: created in its cgroup, or,
// where the kernel gives no socket cgroups, owned by its uid. It returns
// the method it used, an error wrapping ErrNoListener when nothing
// listens, and a *ForeignError naming the first listener outside.
func CheckOwner(addr netip.Addr, port uint16, s Scope) (Method, error) {
	owners, err := ListenerOwners(addr, port)
	if err != nil {
		return 0, err
	}
	m, err := check(owners, addr, port, s, hostFacts())
	var foreign *ForeignError
	if errors.As(err, &foreign) {
		// Where the listener lives tells the operator what holds the
		// port; best effort.
		foreign.fill()
	}
	return m, err
}

// facts are what the decision needs to know of the host.
type facts struct {
	// rootCgroup is the id of the cgroup v2 root, 0 if unknown.
	rootCgroup uint64
	// sharedSkData: before Linux 5.15 a socket's v2 cgroup shared its
	// storage with net_cls/net_prio data, and once a v1 net_cls or
	// net_prio was configured every new socket read the root cgroup.
	sharedSkData bool
	// pathOf finds a cgroup's path from its id (nil: not looked up).
	pathOf func(uint64) (string, error)
}

var hostFacts = sync.OnceValue(func() facts {
	f := facts{pathOf: CgroupPathOfID}
	f.rootCgroup, _ = CgroupIDOfPath("/")
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		f.sharedSkData = kernelBefore(unix.ByteSliceToString(u.Release[:]), 5, 15)
	}
	return f
})

// kernelBefore reports whether a release string such as 6.18.4-foo is
// older than major.minor; an unreadable one counts as older.
func kernelBefore(release string, major, minor int) bool {
	parts := strings.SplitN(release, ".", 3)
	if len(parts) < 2 {
		return true
	}
	maj, err1 := strconv.Atoi(parts[0])
	mnr, err2 := strconv.Atoi(strings.TrimRightFunc(parts[1], func(r rune) bool { return r < '0' || r > '9' }))
	if err1 != nil || err2 != nil {
		return true
	}
	return maj < major || maj == major && mnr < minor
}

func check(owners []Owner, addr netip.Addr, port uint16, s Scope, f facts) (Method, error) {
	owners = receivers(owners, addr, port)
	if len(owners) == 0 {
		return 0, fmt.Errorf("port %d on %s: %w", port, addr, ErrNoListener)
	}
	m, why := method(owners, s, f)
	for _, o := range owners {
		if m == ByCgroup && o.CgroupID != s.CgroupID && !beneath(o.CgroupID, s, f) || m == ByUID && o.UID != s.UID {
			return m, &ForeignError{Addr: addr, Port: port, Scope: s, Owner: o, Method: m, Why: why}
		}
	}
	return m, nil
}

// beneath says whether cgroup id lies beneath the scope's cgroup. Ids
// are never reused, so the path found for one is its own; a cgroup gone
// since its socket was made is not beneath anything.
func beneath(id uint64, s Scope, f facts) bool {
	if s.Path == "" || s.Path == "/" || path.Clean(s.Path) != s.Path || f.pathOf == nil {
		return false
	}
	p, err := f.pathOf(id)
	return err == nil && strings.HasPrefix(p, s.Path+"/")
}

// method picks the cgroup check unless some listener's cgroup cannot be
// told, and says why not.
func method(owners []Owner, s Scope, f facts) (Method, string) {
	if s.CgroupID == 0 {
		return ByUID, "the host has no cgroup v2 id for the scope"
	}
	for _, o := range owners {
		if o.CgroupID == 0 {
			return ByUID, "the kernel reports no socket cgroups (Linux < 5.7)"
		}
		if f.sharedSkData && o.CgroupID == f.rootCgroup && s.CgroupID != f.rootCgroup {
			return ByUID, "before Linux 5.15 a configured net_cls or net_prio makes every socket read the root cgroup"
		}
	}
	return ByCgroup, ""
}

// receivers keeps the listeners a connection to addr:port could reach.
func receivers(all []Owner, addr netip.Addr, port uint16) []Owner {
	var out []Owner
	for _, o := range all {
		if receives(o, addr, port) {
			out = append(out, o)
		}
	}
	return out
}

func receives(o Owner, addr netip.Addr, port uint16) bool {
	if o.Addr.Port() != port {
		return false
	}
	// A connection to ::ffff:a.b.c.d is an IPv4 connection.
	a := addr.Unmap().WithZone("")
	l := o.Addr.Addr().WithZone("")
	switch {
	case !a.IsValid() || a.IsUnspecified():
		return true
	case a.Is4() && l.Is4():
		return l == a || l.IsUnspecified()
	case a.Is4():
		return !o.V6Only && (l.IsUnspecified() || l.Is4In6() && l.Unmap() == a)
	case l.Is4():
		return false
	default:
		return l == a || l.IsUnspecified()
	}
}
