package supervisor_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/lifecycle"
	. "github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// poolGauge reads one pool's gauge from the registry.
func poolGauge(g prometheus.Gatherer, name, pool string) (float64, error) {
	fams, err := g.Gather()
	if err != nil {
		return 0, err
	}
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "pool_id" && l.GetValue() == pool {
					return m.GetGauge().GetValue(), nil
				}
			}
		}
	}
	return 0, fmt.Errorf("no %s for pool %s", name, pool)
}

// The restart rate falls back to 0 once the restarts have left the storm
// window, with nothing else happening to the pool: an alert on the rate
// clears when the storm is over, not when the breaker next changes.
func TestRestartRateFallsAfterTheStormWindow(t *testing.T) {
	const window = 4 * time.Second
	e := testpool.New(t, nil)
	s := e.Pool("rate", "0", "", fmt.Sprintf("StormWindowSec=%d\n", int(window/time.Second)))
	rate := func() float64 {
		v, err := poolGauge(e.Reg, "pool_managerd_restart_rate", "rate")
		require.NoError(t, err)
		return v
	}
	waitFor(t, s, "ready", ready(1))
	assert.Zero(t, rate())

	var lastRestart time.Time
	for n := 2; n <= 3; n++ {
		require.NoError(t, s.Fault("exit:3"))
		waitFor(t, s, "restarted", func(s Snapshot) bool { return s.Starts >= n })
		lastRestart = time.Now()
		waitFor(t, s, "ready again", ready(n))
	}
	before := s.Snapshot()
	require.Equal(t, uint64(2), before.Policy.RestartCount)
	assert.Equal(t, 2, before.Policy.Streak, "two crashes in a row, not yet stable")
	assert.Positive(t, rate(), "restarts are in the window")

	require.Eventually(t, func() bool { return rate() == 0 }, window+5*time.Second, 20*time.Millisecond,
		"the restart rate falls to 0 after the window")
	assert.GreaterOrEqual(t, time.Since(lastRestart), window-500*time.Millisecond, "not before the last restart left the window")
	after := s.Snapshot()
	assert.Equal(t, before.Starts, after.Starts, "no restart happened meanwhile")
	assert.Equal(t, before.Policy.CrashCount, after.Policy.CrashCount, "no crash happened meanwhile")
	assert.Equal(t, lifecycle.Ready, after.State)
	assert.Equal(t, uint64(2), after.Policy.RestartCount, "the restart count is history: it stays")
}
