// Package progress is the stall check: after each good health probe it
// reads the engine's metrics ([Health] ProgressURL=), requests in flight
// and tokens produced, and tells them as Progress; the lifecycle machine
// calls requests in flight and no token for StallSec= a stall. Pools
// without StallSec= have none.
package progress

import (
	"context"
	"errors"

	"github.com/llorch/pool-managerd/internal/check"
	"github.com/llorch/pool-managerd/internal/check/probe"
	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/health"
	"github.com/llorch/pool-managerd/internal/lifecycle"
)

// Name is the kind's name.
const Name = "progress"

// Kind is the stall check.
var Kind = check.Kind{Name: Name, New: New}

// New is the stall check of one engine run (nil: the pool has none).
func New(cfg check.Config) check.Check {
	if cfg.Health.Stall <= 0 {
		return nil
	}
	return &progress{cfg: cfg.Health}
}

type progress struct{ cfg config.Health }

func (p *progress) Schedule() check.Schedule { return check.Schedule{After: probe.Name} }

func (p *progress) Check(ctx context.Context, t check.Target) check.Result {
	// Read from the engine's own scope, like the probe it follows:
	// another user's listener must not vouch for it.
	in, tok, err := health.Progress(ctx, p.cfg.ProgressURL, p.cfg.Timeout, t.Owned)
	return check.Result{Err: err, Events: []lifecycle.Event{
		lifecycle.Progress{Run: t.Run, InFlight: in, Tokens: tok, Err: err, NoAnswer: errors.Is(err, health.ErrNoAnswer)},
	}}
}
