package sockdiag

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

var ne = binary.NativeEndian

// The request is a struct nlmsghdr and a struct inet_diag_req_v2 as
// <linux/inet_diag.h> lays them out: a TCP dump of one family, listeners
// only, no socket cookie.
func TestDumpRequestIsAnInetDiagReqV2(t *testing.T) {
	b := dumpRequest(unix.AF_INET6, 1<<tcpListen, 0, 7)
	require.Len(t, b, 16+56)
	assert.Equal(t, uint32(72), ne.Uint32(b[0:]), "nlmsg_len")
	assert.Equal(t, uint16(20), ne.Uint16(b[4:]), "SOCK_DIAG_BY_FAMILY")
	assert.Equal(t, uint16(0x301), ne.Uint16(b[6:]), "NLM_F_REQUEST|NLM_F_DUMP")
	assert.Equal(t, uint32(7), ne.Uint32(b[8:]), "sequence")
	assert.Equal(t, uint32(0), ne.Uint32(b[12:]), "to the kernel")
	r := b[16:]
	assert.Equal(t, byte(10), r[0], "AF_INET6")
	assert.Equal(t, byte(6), r[1], "IPPROTO_TCP")
	assert.Equal(t, byte(0), r[2], "no extensions: the cgroup id comes unasked")
	assert.Equal(t, uint32(1<<10), ne.Uint32(r[4:]), "TCP_LISTEN only")
	assert.Equal(t, make([]byte, 40), r[8:48], "no socket id")
	assert.Equal(t, []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, r[48:56], "INET_DIAG_NOCOOKIE")
}

// With a port, the request carries INET_DIAG_REQ_BYTECODE: sport >= port
// and sport <= port, each failed test jumping past the end (a reject).
func TestDumpRequestFiltersThePortInTheKernel(t *testing.T) {
	b := dumpRequest(unix.AF_INET, 1<<tcpListen, 8081, 1)
	require.Len(t, b, 16+56+4+16)
	assert.Equal(t, uint32(len(b)), ne.Uint32(b[0:]), "nlmsg_len")
	a := b[16+56:]
	assert.Equal(t, uint16(20), ne.Uint16(a[0:]), "nla_len")
	assert.Equal(t, uint16(1), ne.Uint16(a[2:]), "INET_DIAG_REQ_BYTECODE")
	op := func(code, yes byte, no uint16) []byte { return ne.AppendUint16([]byte{code, yes}, no) }
	want := cat(op(2, 8, 20), op(0, 0, 8081), op(3, 8, 12), op(0, 0, 8081))
	assert.Equal(t, want, a[4:])
}

// diagMsg builds one reply message as the kernel would.
type diagMsg struct {
	family  byte
	addr    netip.Addr
	port    uint16
	ifindex uint32
	uid     uint32
	inode   uint32
	attrs   [][]byte
}

func attr(typ uint16, v []byte) []byte {
	b := make([]byte, nlaAlign(4+len(v)))
	ne.PutUint16(b[0:], uint16(4+len(v)))
	ne.PutUint16(b[2:], typ)
	copy(b[4:], v)
	return b
}

func u64(v uint64) []byte { return ne.AppendUint64(nil, v) }

func nlmsg(typ uint16, seq uint32, body []byte) []byte {
	b := make([]byte, nlmAlign(16+len(body)))
	ne.PutUint32(b[0:], uint32(16+len(body)))
	ne.PutUint16(b[4:], typ)
	ne.PutUint16(b[6:], unix.NLM_F_MULTI)
	ne.PutUint32(b[8:], seq)
	copy(b[16:], body)
	return b
}

func (m diagMsg) bytes(seq uint32) []byte {
	b := make([]byte, sizeofMsg)
	b[0], b[1] = m.family, tcpListen
	binary.BigEndian.PutUint16(b[4:], m.port)
	if m.family == unix.AF_INET {
		a := m.addr.As4()
		copy(b[8:], a[:])
	} else {
		a := m.addr.As16()
		copy(b[8:], a[:])
	}
	ne.PutUint32(b[40:], m.ifindex)
	ne.PutUint32(b[64:], m.uid)
	ne.PutUint32(b[68:], m.inode)
	for _, a := range m.attrs {
		b = append(b, a...)
	}
	return nlmsg(unix.SOCK_DIAG_BY_FAMILY, seq, b)
}

func cat(bs ...[]byte) []byte {
	var out []byte
	for _, b := range bs {
		out = append(out, b...)
	}
	return out
}

// A reply is decoded into owners with their address, uid, inode, bound
// device, v6-only flag and cgroup id; other attributes (here a 5-byte
// INET_DIAG_SHUTDOWN-like one that needs padding), and messages of another
// request, are skipped; NLMSG_DONE ends the dump.
func TestParseMessagesDecodesListeners(t *testing.T) {
	reply := cat(
		diagMsg{family: unix.AF_INET, addr: netip.MustParseAddr("127.0.0.1"), port: 8081, uid: 999, inode: 4711,
			attrs: [][]byte{attr(8, []byte{0}), attr(inetDiagCgroupID, u64(0x1234_5678_9abc))}}.bytes(3),
		diagMsg{family: unix.AF_INET, addr: netip.MustParseAddr("10.0.0.1"), port: 1, uid: 5}.bytes(2),
		diagMsg{family: unix.AF_INET6, addr: netip.MustParseAddr("::"), port: 8081, ifindex: 1, uid: 1001, inode: 17,
			attrs: [][]byte{attr(inetDiagSKV6Only, []byte{1}), attr(inetDiagCgroupID|unix.NLA_F_NET_BYTEORDER, u64(42))}}.bytes(3),
	)
	owners, err := parseMessages(reply, 3, nil)
	require.NoError(t, err)
	assert.Equal(t, []Owner{
		{Addr: netip.MustParseAddrPort("127.0.0.1:8081"), UID: 999, Inode: 4711, CgroupID: 0x1234_5678_9abc},
		{Addr: netip.MustParseAddrPort("[::]:8081"), V6Only: true, Interface: 1, UID: 1001, Inode: 17, CgroupID: 42},
	}, owners)

	owners, err = parseMessages(cat(diagMsg{family: unix.AF_INET6, addr: netip.MustParseAddr("::ffff:127.0.0.1"), port: 9}.bytes(3),
		nlmsg(unix.NLMSG_DONE, 3, make([]byte, 4))), 3, owners)
	assert.ErrorIs(t, err, errDone)
	require.Len(t, owners, 3)
	assert.Equal(t, netip.MustParseAddrPort("[::ffff:127.0.0.1]:9"), owners[2].Addr, "a v4-mapped bind stays mapped")
	assert.Zero(t, owners[2].CgroupID, "no attribute: no cgroup id (Linux < 5.7)")
}

// Whatever bytes arrive, the parser returns an error or owners, never
// panics, and a kernel error is reported with its errno.
func TestParseMessagesRefusesBadReplies(t *testing.T) {
	errMsg := make([]byte, 20)
	ne.PutUint32(errMsg, ^uint32(unix.EINVAL)+1)
	good := diagMsg{family: unix.AF_INET, addr: netip.MustParseAddr("127.0.0.1"), port: 1}.bytes(1)
	badAttr := diagMsg{family: unix.AF_INET, addr: netip.MustParseAddr("127.0.0.1"), port: 1, attrs: [][]byte{{9, 0, 21, 0}}}.bytes(1)
	badFamily := diagMsg{family: unix.AF_INET, addr: netip.MustParseAddr("127.0.0.1")}.bytes(1)
	badFamily[16] = 99
	for name, b := range map[string][]byte{
		"short header":        good[:10],
		"length past the end": func() []byte { b := append([]byte(nil), good...); ne.PutUint32(b, 4096); return b }(),
		"length below header": func() []byte { b := append([]byte(nil), good...); ne.PutUint32(b, 3); return b }(),
		"short inet_diag_msg": nlmsg(unix.SOCK_DIAG_BY_FAMILY, 1, make([]byte, 40)),
		"attribute too long":  badAttr,
		"unknown family":      badFamily,
		"short error":         nlmsg(unix.NLMSG_ERROR, 1, []byte{1}),
	} {
		t.Run(name, func(t *testing.T) {
			_, err := parseMessages(b, 1, nil)
			assert.Error(t, err)
			assert.NotErrorIs(t, err, errDone)
		})
	}
	_, err := parseMessages(nlmsg(unix.NLMSG_ERROR, 1, errMsg), 1, nil)
	assert.ErrorIs(t, err, unix.EINVAL)
}

func FuzzParseMessages(f *testing.F) {
	f.Add(diagMsg{family: unix.AF_INET6, addr: netip.MustParseAddr("::1"), port: 80,
		attrs: [][]byte{attr(inetDiagCgroupID, u64(1)), attr(inetDiagSKV6Only, []byte{1})}}.bytes(1))
	f.Add(nlmsg(unix.NLMSG_DONE, 1, make([]byte, 4)))
	f.Fuzz(func(t *testing.T, b []byte) {
		owners, _ := parseMessages(b, 1, nil)
		for _, o := range owners {
			assert.True(t, o.Addr.IsValid())
		}
	})
}
