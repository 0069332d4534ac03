// Package canary is the canary request as a check: an engine can keep
// answering /health while it cannot generate (vLLM's engine core dead
// under a live API server, a hung decoder). After a good health probe, a
// pool idle for [Health] CanaryIdleSec= is sent CanaryRequest=; its answer
// is told as Probed{Canary}, which the lifecycle machine counts apart
// from the health probes. It is sent only while the pool serves (the
// target's Serving gate): never to an engine asleep, waking or stopping. After a failed canary it is sent after every
// good probe until one succeeds. Pools without CanaryRequest= have none.
package canary

import (
	"context"
	"time"

	"github.com/llorch/pool-managerd/internal/check"
	"github.com/llorch/pool-managerd/internal/check/probe"
	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/health"
	"github.com/llorch/pool-managerd/internal/lifecycle"
)

// Name is the kind's name.
const Name = "canary"

// Kind is the canary request.
var Kind = check.Kind{Name: Name, New: New}

// New is the canary of one engine run (nil: the pool has none).
func New(cfg check.Config) check.Check {
	h := cfg.Health
	if h.Canary == nil || h.CanaryIdle <= 0 {
		return nil
	}
	timeout := h.CanaryTimeout
	if timeout <= 0 {
		timeout = config.DefaultCanaryTimeout
	}
	return &canary{url: cfg.HealthURL, req: *h.Canary, idle: h.CanaryIdle, timeout: timeout,
		progressURL: h.ProgressURL, progressTimeout: h.Timeout, now: time.Now}
}

type canary struct {
	url             string
	req             config.WarmupRequest
	idle, timeout   time.Duration
	progressURL     string
	progressTimeout time.Duration
	now             func() time.Time

	// since is when the engine was last seen in use, or last sent a
	// canary; tokens is the token count last seen (known once read).
	since   time.Time
	tokens  float64
	known   bool
	failing bool
}

func (c *canary) Schedule() check.Schedule { return check.Schedule{After: probe.Name} }

// Check sends the canary if the engine has been idle long enough (or the
// last one failed), to the engine's own scope only.
func (c *canary) Check(ctx context.Context, t check.Target) check.Result {
	now := c.now()
	if c.since.IsZero() {
		// The engine just came up: idle from now.
		c.since = now
	}
	if c.progressURL != "" {
		// An unreadable endpoint leaves the time since the last canary.
		if in, tok, err := health.Progress(ctx, c.progressURL, c.progressTimeout, t.Owned); err == nil {
			if in > 0 || (c.known && tok != c.tokens) {
				c.since = now
			}
			c.tokens, c.known = tok, true
		}
	}
	if !c.failing && now.Sub(c.since) < c.idle {
		return check.Result{}
	}
	var err error
	if !t.Serving.Through(func() {
		err = health.Request(ctx, c.url, c.req.Method, c.req.Path, c.req.Body, c.timeout, t.Owned)
	}) {
		// Asleep, waking or stopping: not sent, and idle from when it
		// serves again.
		c.since, c.failing = now, false
		return check.Result{}
	}
	c.failing = err != nil
	c.since = c.now()
	if c.progressURL != "" {
		// The canary's own tokens are not use: count from after them.
		if _, tok, perr := health.Progress(ctx, c.progressURL, c.progressTimeout, t.Owned); perr == nil {
			c.tokens, c.known = tok, true
		}
	}
	return check.Result{Err: err, Events: []lifecycle.Event{lifecycle.Probed{Run: t.Run, Err: err, Canary: true}}}
}
