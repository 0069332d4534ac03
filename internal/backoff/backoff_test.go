package backoff

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/crash"
)

func TestBase(t *testing.T) {
	p := Defaults()
	cases := []struct {
		n      int
		reason crash.Reason
		want   time.Duration
	}{
		{0, crash.ExitCode, time.Second},
		{1, crash.ExitCode, time.Second},
		{2, crash.Signal, 2 * time.Second},
		{6, crash.ExitCode, 32 * time.Second},
		{7, crash.ExitCode, 60 * time.Second},
		{1000, crash.ExitCode, 60 * time.Second},
		{1, crash.CUDAError, 2 * time.Second},
		{3, crash.CUDAError, 8 * time.Second},
		{6, crash.CUDAError, 60 * time.Second},
	}
	for _, c := range cases {
		assert.Equal(t, c.want, p.Base(c.n, c.reason), "n=%d %s", c.n, c.reason)
	}
	p.Initial = 100 * time.Millisecond
	assert.Equal(t, 500*time.Millisecond, p.Base(1, crash.ExitCode), "clamped up to the minimum")
}

func TestDelayJitterBand(t *testing.T) {
	p := Defaults()
	assert.Equal(t, 900*time.Millisecond, p.Delay(1, crash.ExitCode, 0))
	assert.Equal(t, time.Second, p.Delay(1, crash.ExitCode, 0.5))
	assert.InDelta(t, float64(1100*time.Millisecond), float64(p.Delay(1, crash.ExitCode, 0.999999)), float64(time.Microsecond))
	// At the cap the band is cut, not clamped: still spread, never above.
	assert.Equal(t, 54*time.Second, p.Delay(20, crash.ExitCode, 0))
	assert.InDelta(t, float64(60*time.Second), float64(p.Delay(20, crash.ExitCode, 0.999999)), float64(time.Millisecond))
	assert.Equal(t, 57*time.Second, p.Delay(20, crash.ExitCode, 0.5))
	// At the floor likewise.
	p.Initial = 500 * time.Millisecond
	assert.Equal(t, 500*time.Millisecond, p.Delay(1, crash.ExitCode, 0))
	assert.Equal(t, 525*time.Millisecond, p.Delay(1, crash.ExitCode, 0.5))
}

func TestValidate(t *testing.T) {
	require.NoError(t, Defaults().Validate())
	bad := []func(*Params){
		func(p *Params) { p.Initial = 0 },
		func(p *Params) { p.Min = -1 },
		func(p *Params) { p.Max = p.Min - 1 },
		func(p *Params) { p.JitterPercent = 100 },
		func(p *Params) { p.Stable = 0 },
		func(p *Params) { p.Multiplier = map[crash.Reason]float64{crash.OutOfMemory: 0} },
	}
	for i, f := range bad {
		p := Defaults()
		f(&p)
		assert.Error(t, p.Validate(), "case %d", i)
	}
}
