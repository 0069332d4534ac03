package supervisor

import (
	"context"
	"fmt"
	"net/netip"
	"time"

	"github.com/llorch/pool-managerd/internal/check"
	"github.com/llorch/pool-managerd/internal/check/canary"
	"github.com/llorch/pool-managerd/internal/check/probe"
	"github.com/llorch/pool-managerd/internal/check/progress"
	"github.com/llorch/pool-managerd/internal/check/warmup"
	"github.com/llorch/pool-managerd/internal/engine"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/sockdiag"
)

// checkKinds are the kinds of check an engine may have; each makes its
// check from the pool's configuration, or none.
var checkKinds = []check.Kind{
	probe.Kind,
	progress.Kind,
	warmup.Kind,
	canary.Kind,
}

// watch starts the checks of r (startBy: see lifecycle.Watch); they end
// with r's context. What they find goes to the loop.
func (s *Supervisor) watch(r *run, startBy time.Time) {
	cfg := check.Config{HealthURL: s.cfg.HealthURL, Health: s.cfg.Health}
	target := check.Target{Run: r.id, Owned: s.ownedByScope(r)}
	r.checks = check.Start(r.ctx, checkKinds, cfg, target, startBy, func(ev lifecycle.Event) {
		s.post(func() { s.step(ev) })
	})
}

// ownedByScope verifies that a check's peer is a socket of the engine's
// scope: the socket at the other end of the check's connection, looked up
// by its addresses on a sock_diag socket kept for the run (one request
// per connection). The scope's cgroup and user are found once per run.
func (s *Supervisor) ownedByScope(r *run) func(local, peer netip.AddrPort) error {
	return func(local, peer netip.AddrPort) error {
		r.scopeOnce.Do(func() {
			id := r.e.CgroupID
			p, err := engine.OpenProcess(r.e.PID)
			if err != nil {
				r.scopeErr = fmt.Errorf("finding the engine's user: %w", err)
				return
			}
			defer p.Close()
			if id == 0 {
				id = p.CgroupID
			}
			r.scope = sockdiag.Scope{Unit: r.e.Unit, CgroupID: id, UID: p.UID}
			c, err := sockdiag.Open()
			if err != nil {
				r.scopeErr = err
				return
			}
			r.diag = c
			context.AfterFunc(r.ctx, c.Close)
		})
		if r.scopeErr != nil {
			return r.scopeErr
		}
		_, err := r.diag.CheckPeer(local, peer, r.scope)
		return err
	}
}
