package sockdiag

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
)

// dialTo connects to addr:port and returns both ends' addresses; the
// connection is closed when the test ends.
func dialTo(t *testing.T, addr string, port uint16) (local, remote netip.AddrPort) {
	t.Helper()
	c, err := net.DialTimeout("tcp", net.JoinHostPort(addr, strconv.Itoa(int(port))), 5*time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c.LocalAddr().(*net.TCPAddr).AddrPort(), c.RemoteAddr().(*net.TCPAddr).AddrPort()
}

// The socket at the other end of a connection is found by its addresses,
// made in its listener's cgroup: the engine's passes, whatever address
// family it listens on; another user's, or the engine's user's outside
// the scope, is named.
func TestCheckPeerFindsTheSocketAtTheOtherEnd(t *testing.T) {
	sandbox.Need(t)
	engineUID, squatterUID := uidOf(t, engineUser), uidOf(t, squatterUser)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := Open()
	require.NoError(t, err)
	defer c.Close()
	for _, tc := range []struct {
		spec, addr string
	}{{"tcp4 127.0.0.1:0", "127.0.0.1"}, {"tcp [::]:0", "127.0.0.1"}, {"tcp [::]:0", "::1"}} {
		t.Run(tc.spec+" from "+tc.addr, func(t *testing.T) {
			e := start(t, ctx, engineUser, true, tc.spec)
			id, err := CgroupID(e.pid)
			require.NoError(t, err)
			scope := Scope{Unit: e.unit, CgroupID: id, UID: engineUID}
			local, remote := dialTo(t, tc.addr, e.port)
			o, err := c.Peer(local, remote)
			require.NoError(t, err)
			assert.Equal(t, id, o.CgroupID, "made in the listener's cgroup")
			assert.Equal(t, engineUID, o.UID)
			m, err := c.CheckPeer(local, remote, scope)
			assert.NoError(t, err)
			assert.Equal(t, ByCgroup, m)

			for _, sq := range []struct {
				user    string
				inScope bool
				uid     uint32
			}{{squatterUser, true, squatterUID}, {engineUser, false, engineUID}} {
				s := start(t, ctx, sq.user, sq.inScope, "tcp4 127.0.0.1:0")
				local, remote := dialTo(t, "127.0.0.1", s.port)
				_, err := c.CheckPeer(local, remote, scope)
				var fe *ForeignError
				require.True(t, errors.As(err, &fe), "refused: %v", err)
				assert.Contains(t, err.Error(), fmt.Sprintf("held by a socket of uid %d outside %s", sq.uid, e.unit))
				if sq.inScope {
					assert.Contains(t, err.Error(), "/"+s.unit+", pid "+strconv.Itoa(s.pid))
				}
			}
		})
	}
}

// A connection with no local socket at its other end is ErrNoPeer; then
// CheckPeer asks the port's listeners as CheckOwner does.
func TestPeerOfAnUnknownConnection(t *testing.T) {
	c, err := Open()
	require.NoError(t, err)
	defer c.Close()
	_, err = c.Peer(netip.MustParseAddrPort("127.0.0.1:1"), netip.MustParseAddrPort("127.0.0.1:2"))
	assert.ErrorIs(t, err, ErrNoPeer)
	_, err = c.CheckPeer(netip.MustParseAddrPort("127.0.0.1:1"), netip.MustParseAddrPort("127.0.0.1:2"), Scope{CgroupID: 1})
	assert.ErrorIs(t, err, ErrNoListener)
	c.Close()
	_, err = c.Peer(netip.MustParseAddrPort("127.0.0.1:1"), netip.MustParseAddrPort("127.0.0.1:2"))
	assert.ErrorContains(t, err, "closed")
}

// Squatter names a listener on the port, on any address, that is not the
// scope's, with its cgroup and pid; the scope's own listener, or none, is
// no squatter.
func TestSquatterNamesAListenerOutsideTheScope(t *testing.T) {
	sandbox.Need(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	e := start(t, ctx, engineUser, true, "tcp4 127.0.0.1:0")
	id, err := CgroupID(e.pid)
	require.NoError(t, err)
	scope := Scope{Unit: e.unit, CgroupID: id, UID: uidOf(t, engineUser)}
	f, err := Squatter(e.port, scope)
	require.NoError(t, err)
	assert.Nil(t, f, "the scope's own listener")

	s := start(t, ctx, squatterUser, true, "tcp6 [::1]:0")
	f, err = Squatter(s.port, scope)
	require.NoError(t, err)
	require.NotNil(t, f)
	assert.Equal(t, uidOf(t, squatterUser), f.Owner.UID)
	assert.Equal(t, []int{s.pid}, f.PIDs)
	assert.Contains(t, f.Error(), fmt.Sprintf("port %d on ::1 is held by a socket of uid %d outside %s", s.port, uidOf(t, squatterUser), e.unit))
	assert.Contains(t, f.Error(), "/"+s.unit+", pid "+strconv.Itoa(s.pid)+")")

	f, err = Squatter(freePort(t), scope)
	require.NoError(t, err)
	assert.Nil(t, f, "nobody listens")
}

func freePort(t *testing.T) uint16 {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return uint16(l.Addr().(*net.TCPAddr).Port)
}
