// Package warmup is the warm-up request as a check: once the engine is up
// the lifecycle machine asks for it, and the pool is Ready only once
// [Health] WarmupRequest= has had a 2xx answer within WarmupTimeoutSec=
// (told as WarmedUp). Pools without WarmupRequest= have none.
package warmup

import (
	"context"
	"time"

	"github.com/llorch/pool-managerd/internal/check"
	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/health"
	"github.com/llorch/pool-managerd/internal/lifecycle"
)

// Name is the kind's name: lifecycle.Warmup triggers it.
const Name = "warmup"

// Kind is the warm-up request.
var Kind = check.Kind{Name: Name, New: New}

// New is the warm-up of one engine run (nil: the pool has none).
func New(cfg check.Config) check.Check {
	if cfg.Health.Warmup == nil {
		return nil
	}
	return &warmup{url: cfg.HealthURL, req: *cfg.Health.Warmup, timeout: cfg.Health.WarmupTimeout}
}

type warmup struct {
	url     string
	req     config.WarmupRequest
	timeout time.Duration
}

func (w *warmup) Schedule() check.Schedule { return check.Schedule{OnDemand: true} }

// Check sends the request, to the engine's own scope only.
func (w *warmup) Check(ctx context.Context, t check.Target) check.Result {
	err := health.Request(ctx, w.url, w.req.Method, w.req.Path, w.req.Body, w.timeout, t.Owned)
	return check.Result{Err: err, Events: []lifecycle.Event{lifecycle.WarmedUp{Run: t.Run, Err: err}}}
}
