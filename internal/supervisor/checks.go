package supervisor

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/llorch/pool-managerd/internal/check"
	"github.com/llorch/pool-managerd/internal/check/canary"
	"github.com/llorch/pool-managerd/internal/check/probe"
	"github.com/llorch/pool-managerd/internal/check/progress"
	"github.com/llorch/pool-managerd/internal/check/sleep"
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
	sleep.Sleep,
	sleep.Wake,
}

// watch starts the checks of r (startBy: see lifecycle.Watch); they end
// with r's context. What they find goes to the loop.
func (s *Supervisor) watch(r *run, startBy time.Time) {
	cfg := check.Config{HealthURL: s.cfg.HealthURL, Health: s.cfg.Health, Port: s.cfg.Port, Sleep: s.cfg.Sleep, SleepLevel: s.cfg.SleepLevel}
	target := check.Target{Run: r.id, Owned: s.ownedByScope(r), Serving: &r.serving, Beat: s.beat}
	r.checks = check.Start(r.ctx, checkKinds, cfg, target, startBy, func(ev lifecycle.Event) {
		s.post(func() { s.step(ev) })
	})
}

// ownedByScope verifies that a check's peer is a socket of the engine's
// scope or of a cgroup beneath it: the socket at the other end of the
// check's connection, looked up by its addresses on a sock_diag socket kept
// for the run (one request per connection). The scope's cgroup and user
// are found once per run.
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
			r.scope = sockdiag.Scope{Unit: r.e.Unit, UID: p.UID}
			r.scope.CgroupID, r.scope.Path = scopeCgroup(id, r.e.Unit)
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

// scopeCgroup gives the id and path of the scope's cgroup from the id of
// a cgroup in it: the shim's at the start, or an adopted engine's own,
// which may lie beneath the scope (podman run --cgroups=split moves
// itself there). The scope is the outermost cgroup named after its unit:
// what lies above it is root's. Where the path cannot be found, id is
// kept and only its own sockets pass.
func scopeCgroup(id uint64, unit string) (uint64, string) {
	p, err := sockdiag.CgroupPathOfID(id)
	if err != nil {
		return id, ""
	}
	parts := strings.Split(p, "/")
	for i, c := range parts {
		if c != unit {
			continue
		}
		scope := strings.Join(parts[:i+1], "/")
		if scope == p {
			return id, p
		}
		if sid, err := sockdiag.CgroupIDOfPath(scope); err == nil {
			return sid, scope
		}
		break
	}
	return id, p
}
