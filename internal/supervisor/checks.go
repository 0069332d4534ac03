package supervisor

import (
	"errors"
	"fmt"
	"net/netip"
	"syscall"
	"time"

	"github.com/llorch/pool-managerd/internal/check"
	"github.com/llorch/pool-managerd/internal/check/canary"
	"github.com/llorch/pool-managerd/internal/check/probe"
	"github.com/llorch/pool-managerd/internal/check/progress"
	"github.com/llorch/pool-managerd/internal/check/warmup"
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
// scope. The scope's cgroup is found from the engine's process once per
// run.
func (s *Supervisor) ownedByScope(r *run) func(netip.AddrPort) error {
	return func(peer netip.AddrPort) error {
		r.scopeOnce.Do(func() {
			id, err := sockdiag.CgroupID(r.e.PID)
			if err != nil && !errors.Is(err, sockdiag.ErrNoCgroup2) {
				r.scopeErr = fmt.Errorf("finding the engine's cgroup: %w", err)
				return
			}
			var st syscall.Stat_t
			if err := syscall.Stat(fmt.Sprintf("/proc/%d", r.e.PID), &st); err != nil {
				r.scopeErr = fmt.Errorf("finding the engine's user: %w", err)
				return
			}
			r.scope = sockdiag.Scope{Unit: r.e.Unit, CgroupID: id, UID: st.Uid}
		})
		if r.scopeErr != nil {
			return r.scopeErr
		}
		_, err := sockdiag.CheckOwner(peer.Addr(), peer.Port(), r.scope)
		return err
	}
}
