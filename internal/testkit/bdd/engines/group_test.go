package engines

import (
	"context"
	"fmt"
	"time"

	"github.com/cucumber/godog"

	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/journal"
	lc "github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/manager"
	"github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/testkit/bdd/capture"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// running is a supervisor whose loop testpool already runs: the manager
// must not run it again.
type running struct{ *supervisor.Supervisor }

func (running) Run(ctx context.Context) { <-ctx.Done() }

// groupWorld is what the group steps keep of a scenario: the manager over
// the group's pools, and the background EnsureReady.
type groupWorld struct {
	m      *manager.Manager
	pools  map[string]*testpool.Pool
	lease  string
	ensure chan error
	asked  string
}

func groupSteps(sc *godog.ScenarioContext, w *lifecycle) {
	g := &groupWorld{}
	pool := func(id string) (*testpool.Pool, error) {
		p, ok := g.pools[id]
		if !ok {
			return nil, fmt.Errorf("no pool %q in this scenario", id)
		}
		return p, nil
	}
	sc.Step(`^pools "([^"]+)" and "([^"]+)" of group "([^"]+)" on GPU 0 with GroupDrainSec=(\d+), started as the daemon starts them$`,
		func(ctx context.Context, a, b, group string, drain int) error {
			w.t = &scenarioT{TestingT: godog.T(ctx)}
			w.logs = capture.NewLog()
			w.env = testpool.New(w.t, w.logs)
			extra := fmt.Sprintf("[Pool]\nGroup=%s\nGroupDrainSec=%d\n", group, drain)
			g.pools = map[string]*testpool.Pool{}
			for _, id := range []string{a, b} {
				g.pools[id] = w.env.Start(testpool.Spec{ID: id, Devices: "0", Extra: extra, NoStart: true})
			}
			cfg, err := config.Load(w.env.Dir)
			if err != nil {
				return err
			}
			mctx, cancel := context.WithCancel(w.env.Ctx)
			w.t.Cleanup(cancel)
			g.m, err = manager.Open(mctx, cfg, manager.Options{Log: w.env.Log, Metrics: w.env.Metrics,
				NewPool: func(p *config.Pool) (manager.Pool, error) { return running{g.pools[p.ID].Supervisor}, nil }})
			if err != nil {
				return err
			}
			g.m.Adopt(mctx, func(string) bool { return true })
			w.pool = g.pools[a]
			return nil
		})
	sc.Step(`^pool "([^"]+)" is ready and pool "([^"]+)" is parked$`, func(up, parked string) error {
		p, err := pool(up)
		if err != nil {
			return err
		}
		if _, err := p.Wait("ready", testpool.ReadyAfter(1)); err != nil {
			return err
		}
		q, err := pool(parked)
		if err != nil {
			return err
		}
		_, err = q.Wait("parked", func(s supervisor.Snapshot) bool { return s.State == lc.Idle && !s.Live })
		return err
	})
	sc.Step(`^a router holds a lease on pool "([^"]+)"$`, func(id string) (err error) {
		g.lease, err = g.m.AcquireLease(id, "router")
		return err
	})
	sc.Step(`^EnsureReady is called for pool "([^"]+)" in the background$`, func(id string) {
		g.asked, g.ensure = id, make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			g.ensure <- g.m.EnsureReady(ctx, id, 30*time.Second)
		}()
	})
	sc.Step(`^pool "([^"]+)" is draining with (\d+) active leases?$`, func(id string, n int) error {
		p, err := pool(id)
		if err != nil {
			return err
		}
		s, err := p.Wait("draining", func(s supervisor.Snapshot) bool { return s.State == lc.Draining })
		if err != nil {
			return err
		}
		if int(s.ActiveLeases) != n {
			return fmt.Errorf("%d active leases, want %d", s.ActiveLeases, n)
		}
		return nil
	})
	sc.Step(`^after (\d+) seconds? pool "([^"]+)" is still idle and EnsureReady has not answered$`, func(n int, id string) error {
		time.Sleep(time.Duration(n) * time.Second)
		p, err := pool(id)
		if err != nil {
			return err
		}
		if s := p.Snapshot(); s.State != lc.Idle || s.Live {
			return fmt.Errorf("pool %s is %s (live %v) while the awake one drains", id, s.State, s.Live)
		}
		select {
		case err := <-g.ensure:
			return fmt.Errorf("EnsureReady answered during the drain: %v", err)
		default:
			return nil
		}
	})
	sc.Step(`^the router releases its lease$`, func() error { return g.m.ReleaseLease(g.lease) })
	sc.Step(`^EnsureReady answers with success within (\d+) seconds?$`, func(n int) error {
		select {
		case err := <-g.ensure:
			return err
		case <-time.After(time.Duration(n) * time.Second):
			return fmt.Errorf("EnsureReady for %s did not answer within %d s", g.asked, n)
		}
	})
	sc.Step(`^pool "([^"]+)" is ready$`, func(id string) error {
		p, err := pool(id)
		if err != nil {
			return err
		}
		if s := p.Snapshot(); !s.Ready {
			return fmt.Errorf("pool %s is %s, not ready", id, s.State)
		}
		return nil
	})
	sc.Step(`^pool "([^"]+)" is parked without a crash, journaled with reason "group"$`, func(id string) error {
		p, err := pool(id)
		if err != nil {
			return err
		}
		s, err := p.Wait("parked", func(s supervisor.Snapshot) bool { return s.State == lc.Idle && !s.Live })
		if err != nil {
			return err
		}
		if s.Policy.CrashCount != 0 || !s.NextRestart.IsZero() {
			return fmt.Errorf("pool %s: %d crashes, next restart %s", id, s.Policy.CrashCount, s.NextRestart)
		}
		for _, e := range w.logs.All() {
			if e.Fields[journal.PoolID] == id && e.Msg == "pool parked: its GPUs go to another pool of its group" && e.Fields[journal.Reason] == lc.ReasonGroup {
				return nil
			}
		}
		return fmt.Errorf("no journal entry of pool %s parked with REASON=group", id)
	})
}
