package sockdiag

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
)

// Wire constants of <linux/inet_diag.h> and <net/tcp_states.h> that
// golang.org/x/sys/unix does not carry.
const (
	tcpListen = 10

	inetDiagSKV6Only    = 11 // INET_DIAG_SKV6ONLY: u8
	inetDiagReqBytecode = 1  // INET_DIAG_REQ_BYTECODE
	inetDiagBCSGE       = 2  // INET_DIAG_BC_S_GE
	inetDiagBCSLE       = 3  // INET_DIAG_BC_S_LE
	inetDiagCgroupID    = 21 // INET_DIAG_CGROUP_ID: u64, Linux >= 5.7

	sizeofReq = 56 // struct inet_diag_req_v2
	sizeofMsg = 72 // struct inet_diag_msg
)

// dumpRequest encodes a SOCK_DIAG_BY_FAMILY dump of the TCP sockets of one
// family in the given states and, unless port is 0, with that local port
// (a filter the kernel runs, so a host with many listeners sends only
// these). The kernel adds INET_DIAG_CGROUP_ID to every full socket on its
// own; no extension bit asks for it.
func dumpRequest(family uint8, states uint32, port uint16, seq uint32) []byte {
	size := unix.SizeofNlMsghdr + sizeofReq
	if port != 0 {
		size += 4 + 16
	}
	b := make([]byte, size)
	ne := binary.NativeEndian
	ne.PutUint32(b[0:], uint32(len(b)))
	ne.PutUint16(b[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint16(b[6:], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	ne.PutUint32(b[8:], seq)
	r := b[unix.SizeofNlMsghdr:]
	r[0] = family
	r[1] = unix.IPPROTO_TCP
	ne.PutUint32(r[4:], states)
	// A dump ignores the socket id, but the cookie must say "none".
	ne.PutUint32(r[48:], ^uint32(0))
	ne.PutUint32(r[52:], ^uint32(0))
	if port != 0 {
		// sport >= port && sport <= port: S_GE and S_LE are in every
		// kernel (S_EQ only since 4.16). Each test is an op {code, yes,
		// no} and an op carrying the port; yes goes on to the next pair,
		// no jumps past the end (len+4), which rejects the socket.
		a := r[sizeofReq:]
		ne.PutUint16(a[0:], 4+16)
		ne.PutUint16(a[2:], inetDiagReqBytecode)
		bc := a[4:]
		bc[0], bc[1] = inetDiagBCSGE, 8
		ne.PutUint16(bc[2:], 16+4)
		ne.PutUint16(bc[6:], port)
		bc[8], bc[9] = inetDiagBCSLE, 8
		ne.PutUint16(bc[10:], 8+4)
		ne.PutUint16(bc[14:], port)
	}
	return b
}

// errDone ends a dump.
var errDone = errors.New("done")

// parseMessages decodes one datagram of a dump reply, appending the
// sockets to owners; it returns errDone at NLMSG_DONE. Messages of another
// sequence number are skipped.
func parseMessages(b []byte, seq uint32, owners []Owner) ([]Owner, error) {
	ne := binary.NativeEndian
	for len(b) > 0 {
		if len(b) < unix.SizeofNlMsghdr {
			return owners, fmt.Errorf("sockdiag: short netlink header (%d bytes)", len(b))
		}
		l := int(ne.Uint32(b[0:]))
		typ := ne.Uint16(b[4:])
		if l < unix.SizeofNlMsghdr || l > len(b) {
			return owners, fmt.Errorf("sockdiag: bad netlink message length %d of %d", l, len(b))
		}
		body := b[unix.SizeofNlMsghdr:l]
		mseq := ne.Uint32(b[8:])
		if a := nlmAlign(l); a < len(b) {
			b = b[a:]
		} else {
			b = nil
		}
		if mseq != seq {
			continue
		}
		switch typ {
		case unix.NLMSG_DONE:
			return owners, errDone
		case unix.NLMSG_ERROR:
			if len(body) < 4 {
				return owners, errors.New("sockdiag: short netlink error")
			}
			if errno := -int32(ne.Uint32(body)); errno != 0 {
				return owners, fmt.Errorf("sockdiag: inet_diag dump: %w", unix.Errno(errno))
			}
			continue
		case unix.SOCK_DIAG_BY_FAMILY:
			o, err := parseOwner(body)
			if err != nil {
				return owners, err
			}
			owners = append(owners, o)
		}
	}
	return owners, nil
}

// parseOwner decodes one struct inet_diag_msg and its attributes.
func parseOwner(b []byte) (Owner, error) {
	if len(b) < sizeofMsg {
		return Owner{}, fmt.Errorf("sockdiag: short inet_diag_msg (%d bytes)", len(b))
	}
	ne := binary.NativeEndian
	port := binary.BigEndian.Uint16(b[4:])
	var addr netip.Addr
	switch b[0] {
	case unix.AF_INET:
		addr = netip.AddrFrom4([4]byte(b[8:12]))
	case unix.AF_INET6:
		addr = netip.AddrFrom16([16]byte(b[8:24]))
	default:
		return Owner{}, fmt.Errorf("sockdiag: inet_diag_msg of family %d", b[0])
	}
	o := Owner{
		Addr:      netip.AddrPortFrom(addr, port),
		Interface: ne.Uint32(b[40:]),
		UID:       ne.Uint32(b[64:]),
		Inode:     ne.Uint32(b[68:]),
	}
	for a := b[sizeofMsg:]; len(a) >= 4; {
		l := int(ne.Uint16(a[0:]))
		typ := ne.Uint16(a[2:]) &^ (unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER)
		if l < 4 || l > len(a) {
			return Owner{}, fmt.Errorf("sockdiag: bad attribute length %d of %d", l, len(a))
		}
		v := a[4:l]
		switch {
		case typ == inetDiagCgroupID && len(v) == 8:
			o.CgroupID = ne.Uint64(v)
		case typ == inetDiagSKV6Only && len(v) >= 1:
			o.V6Only = v[0] != 0
		}
		if n := nlaAlign(l); n < len(a) {
			a = a[n:]
		} else {
			a = nil
		}
	}
	return o, nil
}

func nlmAlign(n int) int { return (n + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1) }
func nlaAlign(n int) int { return (n + unix.NLA_ALIGNTO - 1) &^ (unix.NLA_ALIGNTO - 1) }

// dump asks the kernel for the TCP sockets of both families in the given
// states on port (0: any), over one NETLINK_SOCK_DIAG socket. Any user
// may: the kernel hides nothing this package reads.
func dump(states uint32, port uint16) ([]Owner, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("sockdiag: netlink socket: %w", err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, fmt.Errorf("sockdiag: netlink bind: %w", err)
	}
	// The kernel answers at once; the bound keeps a caller's loop safe
	// whatever happens.
	tv := unix.NsecToTimeval((5 * time.Second).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return nil, fmt.Errorf("sockdiag: netlink timeout: %w", err)
	}
	buf := make([]byte, 64<<10)
	var owners []Owner
	for i, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		seq := uint32(i + 1)
		if err := unix.Sendto(fd, dumpRequest(family, states, port, seq), 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
			return nil, fmt.Errorf("sockdiag: netlink send: %w", err)
		}
		for {
			n, _, flags, from, err := unix.Recvmsg(fd, buf, nil, 0)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return nil, fmt.Errorf("sockdiag: netlink receive: %w", err)
			}
			// Only the kernel (port 0) answers.
			if sa, ok := from.(*unix.SockaddrNetlink); !ok || sa.Pid != 0 {
				continue
			}
			if flags&unix.MSG_TRUNC != 0 {
				return nil, errors.New("sockdiag: netlink message truncated")
			}
			owners, err = parseMessages(buf[:n], seq, owners)
			if err == errDone {
				break
			}
			// A kernel without IPv6 has no AF_INET6 handler.
			if family == unix.AF_INET6 && errors.Is(err, unix.ENOENT) {
				break
			}
			if errors.Is(err, unix.ENOENT) {
				return nil, fmt.Errorf("%w (is the tcp_diag module available?)", err)
			}
			if err != nil {
				return nil, err
			}
		}
	}
	return owners, nil
}
