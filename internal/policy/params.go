// Package policy decides, for one pool, whether and when a crashed engine
// restarts. It composes the backoff, the circuit breakers and the restart
// storm window into a state machine with no goroutines, no I/O and no clock
// of its own: events and the current time go in, decisions and the events
// worth logging come out.
package policy

import (
	"errors"
	"fmt"
	"time"

	"github.com/llorch/pool-managerd/internal/backoff"
	"github.com/llorch/pool-managerd/internal/breaker"
	"github.com/llorch/pool-managerd/internal/storm"
)

// Params are a pool's [Restart] settings.
type Params struct {
	Backoff backoff.Params
	Breaker breaker.Params
	Storm   storm.Params
	// RestartCountReset is how long an engine must run healthy before its
	// restart count starts over.
	RestartCountReset time.Duration
}

// Defaults are the seed's numbers.
func Defaults() Params {
	return Params{
		Backoff:           backoff.Defaults(),
		Breaker:           breaker.Defaults(),
		Storm:             storm.Defaults(),
		RestartCountReset: 600 * time.Second,
	}
}

// Validate reports every setting that cannot work.
func (p Params) Validate() error {
	var errs []error
	if err := p.Backoff.Validate(); err != nil {
		errs = append(errs, fmt.Errorf("backoff: %w", err))
	}
	if err := p.Breaker.Validate(); err != nil {
		errs = append(errs, fmt.Errorf("circuit breaker: %w", err))
	}
	if err := p.Storm.Validate(); err != nil {
		errs = append(errs, fmt.Errorf("restart storm: %w", err))
	}
	if p.RestartCountReset <= 0 {
		errs = append(errs, fmt.Errorf("restart count reset must be positive, got %s", p.RestartCountReset))
	}
	return errors.Join(errs...)
}
