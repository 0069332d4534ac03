package probe

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"testing"

	"github.com/llorch/pool-managerd/internal/check"
	"github.com/llorch/pool-managerd/internal/sockdiag"
)

// BenchmarkProbeOfAReadyEngine is one look at a Ready engine: without a
// peer check (as before every look checked it), checking the listeners
// on the port (a dump of both families per look), and looking up the
// peer socket of the look's connection on a kept sock_diag socket (what
// a look costs now).
func BenchmarkProbeOfAReadyEngine(b *testing.B) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer srv.Close()
	id, err := sockdiag.CgroupID(os.Getpid())
	if err != nil {
		b.Skipf("no cgroup v2 id here: %v", err)
	}
	scope := sockdiag.Scope{Unit: "pool-engine-bench.scope", CgroupID: id, UID: uint32(os.Getuid())}
	conn, err := sockdiag.Open()
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	for _, bc := range []struct {
		name  string
		owned func(local, peer netip.AddrPort) error
	}{
		{"unchecked", nil},
		{"listeners", func(_, peer netip.AddrPort) error {
			_, err := sockdiag.CheckOwner(peer.Addr(), peer.Port(), scope)
			return err
		}},
		{"peer", func(local, peer netip.AddrPort) error {
			_, err := conn.CheckPeer(local, peer, scope)
			return err
		}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			c := New(cfg(srv.URL + "/health"))
			tgt := check.Target{Run: 1, Owned: bc.owned}
			if bc.owned == nil {
				// Up without a check: the look then skips it, as a
				// Ready engine's did.
				tgt.Owned = func(_, _ netip.AddrPort) error { return nil }
			}
			if res := c.Check(context.Background(), tgt); res.Err != nil {
				b.Fatal(res.Err)
			}
			tgt.Owned = bc.owned
			b.ReportAllocs()
			for b.Loop() {
				if res := c.Check(context.Background(), tgt); res.Err != nil {
					b.Fatal(res.Err)
				}
			}
		})
	}
}
