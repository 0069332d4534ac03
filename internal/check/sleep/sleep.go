// Package sleep is vLLM's sleep mode as two checks the lifecycle machine
// asks for ([Engine] Sleep=vllm): Sleep sends POST /sleep?level=N, Wake
// POST /wake_up, each to the engine's own port on loopback and answered
// only by a socket of the engine's scope (as every probe is), told as
// Slept and Woke. Pools without Sleep=vllm have neither.
package sleep

import (
	"context"
	"fmt"
	"time"

	"github.com/llorch/pool-managerd/internal/check"
	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/health"
	"github.com/llorch/pool-managerd/internal/lifecycle"
)

// Names of the kinds: lifecycle.Sleep and lifecycle.Wake trigger them.
const (
	SleepName = "sleep"
	WakeName  = "wake"
)

// DefaultTimeout bounds a sleep or a wake where StartTimeoutSec= is not
// set: vLLM moves the weights off or onto the GPU, seconds to minutes.
const DefaultTimeout = 5 * time.Minute

var (
	// Sleep puts the engine to sleep.
	Sleep = check.Kind{Name: SleepName, New: func(cfg check.Config) check.Check { return newCall(cfg, false) }}
	// Wake wakes it.
	Wake = check.Kind{Name: WakeName, New: func(cfg check.Config) check.Check { return newCall(cfg, true) }}
)

func newCall(cfg check.Config, wake bool) check.Check {
	if cfg.Sleep != config.SleepVLLM || cfg.Port <= 0 {
		return nil
	}
	timeout := cfg.Health.StartTimeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	level := min(max(cfg.SleepLevel, 1), 2)
	return &call{base: fmt.Sprintf("http://127.0.0.1:%d", cfg.Port), wake: wake, level: level, timeout: timeout}
}

type call struct {
	base    string
	wake    bool
	level   int
	timeout time.Duration
}

func (c *call) Schedule() check.Schedule { return check.Schedule{OnDemand: true} }

// Check asks the engine, on its own scope's socket only.
func (c *call) Check(ctx context.Context, t check.Target) check.Result {
	if c.wake {
		err := health.Request(ctx, c.base, "POST", "/wake_up", "", c.timeout, t.Owned)
		return check.Result{Err: err, Events: []lifecycle.Event{lifecycle.Woke{Run: t.Run, Err: err}}}
	}
	// No canary reaches the engine from now until it serves again, and
	// none is in flight as it is asked to sleep.
	t.Serving.ShutAndWait()
	err := health.Request(ctx, c.base, "POST", fmt.Sprintf("/sleep?level=%d", c.level), "", c.timeout, t.Owned)
	return check.Result{Err: err, Events: []lifecycle.Event{lifecycle.Slept{Run: t.Run, Err: err}}}
}
