// Package probe is the engine's health probe as a check: GET HealthURL=,
// 200 is healthy. Its first good look says the engine is up (Healthy);
// after that each look is told as Probed. It looks every [Health]
// IntervalSec=, often at the start, until StartTimeoutSec=.
package probe

import (
	"context"
	"errors"

	"github.com/llorch/pool-managerd/internal/check"
	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/health"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/sockdiag"
)

// Name is the kind's name.
const Name = "health"

// Kind is the health probe: every pool has one.
var Kind = check.Kind{Name: Name, New: New}

// New is the probe of one engine run.
func New(cfg check.Config) check.Check {
	return &probe{cfg: cfg.Health, prober: health.New(cfg.HealthURL, cfg.Health.Timeout)}
}

type probe struct {
	cfg    config.Health
	prober *health.Prober
	// up: a look has answered (the engine is up); squatted: a foreign
	// socket was told; good: the last look told was good.
	up, squatted, good bool
}

func (p *probe) Schedule() check.Schedule {
	return check.Schedule{Every: p.cfg.Interval, StartTimeout: p.cfg.StartTimeout}
}

func (p *probe) Check(ctx context.Context, t check.Target) check.Result {
	// An answer counts only from a socket of the engine's own scope, on
	// every look: after Ready the engine may close its listener (or share
	// its port through SO_REUSEPORT) and another process take it.
	err := p.prober.Probe(ctx, t.Owned)
	res := check.Result{Err: err}
	var foreign *sockdiag.ForeignError
	if errors.As(err, &foreign) && !p.squatted {
		p.squatted = true
		res.Events = append(res.Events, lifecycle.Squatted{Run: t.Run, Msg: foreign.Error()})
	}
	if !p.up {
		if err == nil {
			p.up, p.good = true, true
			res.Events = append(res.Events, lifecycle.Healthy{Run: t.Run})
		}
		return res
	}
	if err == nil && p.good && len(res.Events) == 0 {
		// Nothing changed: the machine is not told, the time is kept.
		res.Beat = true
		return res
	}
	p.good = err == nil
	res.Events = append(res.Events, lifecycle.Probed{Run: t.Run, Err: err})
	return res
}
