package metrics

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/crash"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/policy"
)

func TestFamilyNames(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg)
	// Touch one series of each vector so every family is gathered.
	m.DrainDuration.WithLabelValues("p", "drained").Observe(1)
	m.Drains.WithLabelValues("p", "drained").Inc()
	m.DrainForceStops.WithLabelValues("p").Inc()
	m.ReloadDuration.WithLabelValues("p", "success").Observe(1)
	m.ReloadSuccess.WithLabelValues("p").Inc()
	m.ReloadFailure.WithLabelValues("p", "health").Inc()
	m.PoolReady.WithLabelValues("p").Set(1)
	m.PoolLive.WithLabelValues("p").Set(1)
	m.PoolDraining.WithLabelValues("p").Set(0)
	m.ActiveLeases.WithLabelValues("p").Set(2)
	m.PoolInfo.WithLabelValues("p", "m", "b1", "0,1").Set(1)
	m.HealthCheckFailures.WithLabelValues("p").Inc()
	tr := policy.New(policy.Defaults(), func() float64 { return 0.5 })
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	d := tr.Crash(now, crash.OutOfMemory)
	m.Policy("p", d.Events, tr.Status(now))

	fams, err := reg.Gather()
	require.NoError(t, err)
	var names []string
	for _, f := range fams {
		names = append(names, f.GetName())
	}
	assert.ElementsMatch(t, []string{
		"pool_managerd_drain_duration_seconds", "pool_managerd_drains_total", "pool_managerd_drain_force_stops_total",
		"pool_managerd_reload_duration_seconds", "pool_managerd_reload_success_total", "pool_managerd_reload_failure_total",
		"pool_managerd_engine_crashes_total", "pool_managerd_backoff_delay_seconds", "pool_managerd_restarts_scheduled_total",
		"pool_managerd_circuit_breaker_state", "pool_managerd_restart_rate",
		"pool_managerd_pool_ready", "pool_managerd_pool_live", "pool_managerd_pool_draining", "pool_managerd_active_leases",
		"pool_managerd_pool_info", "pool_managerd_health_check_failures_total", "pool_managerd_build_info",
		"pool_managerd_bus_rejected_total",
	}, names, "opens and storms appear once they happen")
	assert.Equal(t, 1.0, testutil.ToFloat64(m.EngineCrashes.WithLabelValues("p", "out_of_memory")))
	assert.Equal(t, 6, testutil.CollectAndCount(m.BreakerState), "one state series per breaker class")
}

func TestForget(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg)
	m.PoolReady.WithLabelValues("gone").Set(1)
	m.EngineCrashes.WithLabelValues("gone", "signal").Inc()
	m.EngineCrashes.WithLabelValues("kept", "signal").Inc()
	m.Forget("gone")
	assert.Equal(t, 0, testutil.CollectAndCount(m.PoolReady))
	require.NoError(t, testutil.CollectAndCompare(m.EngineCrashes, strings.NewReader(`
# HELP pool_managerd_engine_crashes_total Engine crashes by reason.
# TYPE pool_managerd_engine_crashes_total counter
pool_managerd_engine_crashes_total{pool_id="kept",reason="signal"} 1
`)))
}

// A pool's idle state has its series, and its idle stops and starts on
// demand count from zero.
func TestIdleSeries(t *testing.T) {
	m := New(prometheus.NewRegistry())
	m.InitPool("p")
	assert.Equal(t, 0.0, testutil.ToFloat64(m.IdleStops.WithLabelValues("p")))
	assert.Equal(t, 0.0, testutil.ToFloat64(m.LeaseStarts.WithLabelValues("p")))
	assert.Equal(t, 0.0, testutil.ToFloat64(m.PoolState.WithLabelValues("p", "idle")))
	m.SetPoolState("p", lifecycle.Idle)
	assert.Equal(t, 1.0, testutil.ToFloat64(m.PoolState.WithLabelValues("p", "idle")))
	assert.Equal(t, 0.0, testutil.ToFloat64(m.PoolState.WithLabelValues("p", "stopped")))
	assert.Equal(t, 10, testutil.CollectAndCount(m.PoolState))
	m.SetPoolState("p", lifecycle.Sleeping)
	assert.Equal(t, 1.0, testutil.ToFloat64(m.PoolState.WithLabelValues("p", "sleeping")))
	assert.Equal(t, 0.0, testutil.ToFloat64(m.PoolState.WithLabelValues("p", "waking")))
	assert.Equal(t, 0.0, testutil.ToFloat64(m.Wakes.WithLabelValues("p", "ok")))
	assert.Equal(t, 0.0, testutil.ToFloat64(m.Wakes.WithLabelValues("p", "failed")))
	assert.Equal(t, 1, testutil.CollectAndCount(m.WakeDuration))
	m.Forget("p")
	assert.Equal(t, 0, testutil.CollectAndCount(m.IdleStops))
	assert.Equal(t, 0, testutil.CollectAndCount(m.Wakes))
	assert.Equal(t, 0, testutil.CollectAndCount(m.WakeDuration))
}
