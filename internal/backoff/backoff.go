// Package backoff computes restart delays: exponential in the crash streak,
// scaled per crash reason, clamped, and jittered so that pools that crash
// together do not restart together.
package backoff

import (
	"fmt"
	"math"
	"time"

	"github.com/llorch/pool-managerd/internal/crash"
)

// Params are the [Restart] backoff settings of a pool.
type Params struct {
	Initial time.Duration
	Max     time.Duration
	Min     time.Duration
	// JitterPercent spreads each delay uniformly over +/- this share.
	JitterPercent float64
	// Stable is how long an engine must run healthy before its crash
	// streak, and so its delay, starts over.
	Stable time.Duration
	// Multiplier scales the delay for some reasons (CUDA faults need the
	// driver to settle, so they wait longer).
	Multiplier map[crash.Reason]float64
}

// Defaults are the seed's numbers.
func Defaults() Params {
	return Params{
		Initial:       time.Second,
		Max:           60 * time.Second,
		Min:           500 * time.Millisecond,
		JitterPercent: 10,
		Stable:        300 * time.Second,
		Multiplier:    map[crash.Reason]float64{crash.CUDAError: 2},
	}
}

// Validate reports settings that cannot produce a sane schedule.
func (p Params) Validate() error {
	switch {
	case p.Initial <= 0:
		return fmt.Errorf("initial delay must be positive, got %s", p.Initial)
	case p.Min < 0:
		return fmt.Errorf("minimum delay must not be negative, got %s", p.Min)
	case p.Max < p.Min:
		return fmt.Errorf("maximum delay %s is below the minimum %s", p.Max, p.Min)
	case p.JitterPercent < 0 || p.JitterPercent >= 100:
		return fmt.Errorf("jitter must be in [0, 100) percent, got %g", p.JitterPercent)
	case p.Stable <= 0:
		return fmt.Errorf("stable period must be positive, got %s", p.Stable)
	}
	for r, m := range p.Multiplier {
		if !(m > 0) || math.IsInf(m, 0) {
			return fmt.Errorf("multiplier for %s must be a positive number, got %g", r, m)
		}
	}
	return nil
}

// Base is the delay before jitter for the n-th crash in a streak (n >= 1):
// clamp(initial * 2^(n-1) * multiplier(reason), min, max).
func (p Params) Base(n int, reason crash.Reason) time.Duration {
	if n < 1 {
		n = 1
	}
	m, ok := p.Multiplier[reason]
	if !ok {
		m = 1
	}
	// Past 2^62 the float product only gets clamped to Max anyway.
	d := float64(p.Initial) * math.Pow(2, float64(min(n-1, 62))) * m
	return clamp(d, p.Min, p.Max)
}

// Delay is Base with jitter applied; u must be uniform in [0, 1). The delay
// is uniform over base +/- JitterPercent cut to [Min, Max]: the cap is a
// promise to the operator, and cutting the band (rather than clamping the
// value) keeps pools at the cap spread out instead of piling up on it.
func (p Params) Delay(n int, reason crash.Reason, u float64) time.Duration {
	base := float64(p.Base(n, reason))
	j := p.JitterPercent / 100
	lo := math.Max(base*(1-j), float64(p.Min))
	hi := math.Min(base*(1+j), float64(p.Max))
	return clamp(lo+u*(hi-lo), p.Min, p.Max)
}

func clamp(d float64, lo, hi time.Duration) time.Duration {
	switch {
	case d < float64(lo):
		return lo
	case d > float64(hi):
		return hi
	}
	return time.Duration(math.Round(d))
}
