// Package metrics defines every Prometheus family pool-managerd exports and
// turns policy events into their values. Families are in base units with
// the pool_managerd_ prefix; pool-level families carry pool_id.
package metrics

import (
	"runtime"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/llorch/pool-managerd/internal/breaker"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/policy"
)

// Version is the daemon's version, set at link time.
var Version = "dev"

const ns = "pool_managerd"

// Set holds the families, registered on one registry.
type Set struct {
	DrainDuration   *prometheus.HistogramVec
	Drains          *prometheus.CounterVec
	DrainForceStops *prometheus.CounterVec
	// IdleStops counts engines stopped for want of use; LeaseStarts the
	// starts a lease or EnsureReady made.
	IdleStops   *prometheus.CounterVec
	LeaseStarts *prometheus.CounterVec
	// Wakes counts wakes of sleeping engines by result (ok, failed);
	// WakeDuration is how long a good one took, from the wake to Ready.
	Wakes             *prometheus.CounterVec
	WakeDuration      *prometheus.HistogramVec
	ReloadDuration    *prometheus.HistogramVec
	ReloadSuccess     *prometheus.CounterVec
	ReloadFailure     *prometheus.CounterVec
	EngineCrashes     *prometheus.CounterVec
	BackoffDelay      *prometheus.HistogramVec
	RestartsScheduled *prometheus.CounterVec
	BreakerOpens      *prometheus.CounterVec
	BreakerState      *prometheus.GaugeVec
	RestartStorms     *prometheus.CounterVec
	RestartRate       *prometheus.GaugeVec
	PoolReady         *prometheus.GaugeVec
	PoolLive          *prometheus.GaugeVec
	PoolDraining      *prometheus.GaugeVec
	// PoolState is 1 for the pool's state and 0 for every other.
	PoolState           *prometheus.GaugeVec
	ActiveLeases        *prometheus.GaugeVec
	PoolInfo            *prometheus.GaugeVec
	HealthCheckFailures *prometheus.CounterVec
	BuildInfo           *prometheus.GaugeVec
	// GPUUnhealthy is 1 while a GPU needs a reset, is lost or is held.
	GPUUnhealthy *prometheus.GaugeVec
	// GPUXIDs counts XIDs by GPU and how they were tied: "pool" (to a
	// process in a pool's scope), "none" (a process-tied XID of a process
	// in no pool's scope: journaled only), "device" (the GPU itself: every
	// pool on it acts).
	GPUXIDs *prometheus.CounterVec
	// BusRejected counts what other bus users sent that the daemon
	// refused, by reason (access_denied, forged_signal).
	BusRejected *prometheus.CounterVec
	// KernelLogReadable is 1 while the kernel's journal entries are read
	// for the driver's XID lines, 0 while they cannot be: then a
	// process-tied XID restarts no pool. Absent without NVML.
	KernelLogReadable *prometheus.GaugeVec
	// GroupSwaps counts the turns of a group that parked its awake member
	// for another; GroupSwapDuration is how long each took, from the park
	// to the asked pool's start answered.
	GroupSwaps        *prometheus.CounterVec
	GroupSwapDuration *prometheus.HistogramVec

	touched chan struct{}
}

// New creates the families and registers them on reg.
func New(reg prometheus.Registerer) *Set {
	counter := func(name, help string, labels ...string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: name, Help: help}, labels)
	}
	gauge := func(name, help string, labels ...string) *prometheus.GaugeVec {
		return prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: name, Help: help}, labels)
	}
	histogram := func(name, help string, buckets []float64, labels ...string) *prometheus.HistogramVec {
		return prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: ns, Name: name, Help: help, Buckets: buckets}, labels)
	}
	m := &Set{
		DrainDuration: histogram("drain_duration_seconds", "Time from a drain request to its outcome.",
			[]float64{.001, .01, .1, .5, 1, 5, 10, 30, 60, 120, 300}, "pool_id", "outcome"),
		Drains:          counter("drains_total", "Drains by outcome (drained or forced).", "pool_id", "outcome"),
		DrainForceStops: counter("drain_force_stops_total", "Drains that hit their deadline and force-stopped the engine.", "pool_id"),
		IdleStops:       counter("idle_stops_total", "Engines stopped because nobody used the pool for IdleStopSec (the pool went idle).", "pool_id"),
		LeaseStarts:     counter("lease_starts_total", "Starts made on demand: a lease (StartOnLease) or EnsureReady.", "pool_id"),
		Wakes:           counter("wakes_total", "Wakes of sleeping engines (Sleep=) by result: ok, or failed (the engine was replaced).", "pool_id", "result"),
		WakeDuration: histogram("wake_duration_seconds", "Time from a sleeping engine's wake to the pool being ready again (its warm-up included).",
			[]float64{.1, .5, 1, 2, 5, 10, 30, 60, 120}, "pool_id"),
		ReloadDuration: histogram("reload_duration_seconds", "Time from a reload request to its outcome.",
			[]float64{1, 5, 10, 30, 60, 120, 300, 600}, "pool_id", "outcome"),
		ReloadSuccess: counter("reload_success_total", "Reloads that switched the pool to the new model.", "pool_id"),
		ReloadFailure: counter("reload_failure_total", "Reloads that failed, by reason.", "pool_id", "reason"),
		EngineCrashes: counter("engine_crashes_total", "Engine crashes by reason.", "pool_id", "reason"),
		BackoffDelay: histogram("backoff_delay_seconds", "Backoff delay chosen before a restart.",
			[]float64{.5, 1, 2, 4, 8, 16, 32, 60, 120, 300}, "pool_id", "crash_reason"),
		RestartsScheduled:   counter("restarts_scheduled_total", "Restarts scheduled after a crash.", "pool_id", "crash_reason"),
		BreakerOpens:        counter("circuit_breaker_opens_total", "Times a circuit breaker opened.", "pool_id", "class"),
		BreakerState:        gauge("circuit_breaker_state", "Circuit breaker state: 0 closed, 1 open, 2 half-open.", "pool_id", "class"),
		RestartStorms:       counter("restart_storms_total", "Restart storms by kind.", "pool_id", "kind"),
		RestartRate:         gauge("restart_rate", "Restarts in the restart storm window.", "pool_id"),
		PoolReady:           gauge("pool_ready", "1 when the pool is ready to take leases.", "pool_id"),
		PoolLive:            gauge("pool_live", "1 when the pool's engine process is up.", "pool_id"),
		PoolDraining:        gauge("pool_draining", "1 while the pool drains.", "pool_id"),
		PoolState:           gauge("pool_state", "1 for the pool's state (stopped, starting, warming, ready, draining, backoff, failed, idle, sleeping, waking), 0 for the others.", "pool_id", "state"),
		ActiveLeases:        gauge("active_leases", "Leases held on the pool.", "pool_id"),
		PoolInfo:            gauge("pool_info", "Constant 1, labelled with what the pool runs.", "pool_id", "model", "engine_version", "device_mask"),
		HealthCheckFailures: counter("health_check_failures_total", "Failed engine health probes.", "pool_id"),
		BuildInfo:           gauge("build_info", "Constant 1, labelled with the daemon's build.", "version", "goversion"),
		GPUUnhealthy:        gauge("gpu_unhealthy", "1 while a GPU needs a reset (reason reset), is lost (reason lost) or is not known to be usable (reason hold); its pools are held.", "gpu_uuid", "reason"),
		GPUXIDs:             counter("gpu_xids_total", "XIDs by GPU and tie: pool (a process in a pool's scope), none (a process in no pool's scope: no pool acts), device (the GPU itself).", "gpu_uuid", "xid", "tied"),
		BusRejected:         counter("bus_rejected_total", "Bus messages from others that the daemon refused, by reason (access_denied, forged_signal).", "reason"),
		KernelLogReadable:   gauge("kernel_log_readable", "1 while the kernel's journal entries are read for the driver's XID lines, 0 while they cannot be (process-tied XIDs restart no pool)."),
		GroupSwaps:          counter("group_swaps_total", "Swaps in a group of pools that share GPUs: its awake member parked for the one asked for.", "group"),
		GroupSwapDuration: histogram("group_swap_duration_seconds", "Time a group swap took: the awake member's drain and stop, then the asked pool's start.",
			[]float64{.1, .5, 1, 5, 10, 30, 60, 120, 300, 600}, "group"),
		touched: make(chan struct{}, 1),
	}
	reg.MustRegister(m.DrainDuration, m.Drains, m.DrainForceStops, m.ReloadDuration, m.ReloadSuccess,
		m.ReloadFailure, m.EngineCrashes, m.BackoffDelay, m.RestartsScheduled, m.BreakerOpens,
		m.BreakerState, m.RestartStorms, m.RestartRate, m.PoolReady, m.PoolLive, m.PoolDraining,
		m.PoolState, m.ActiveLeases, m.PoolInfo, m.HealthCheckFailures, m.BuildInfo, m.GPUUnhealthy,
		m.GPUXIDs, m.BusRejected, m.KernelLogReadable, m.IdleStops, m.LeaseStarts, m.Wakes, m.WakeDuration,
		m.GroupSwaps, m.GroupSwapDuration)
	m.BuildInfo.WithLabelValues(Version, runtime.Version()).Set(1)
	// Zero from the start, so that the first refusal is an increase an
	// alert can see.
	for _, reason := range []string{"access_denied", "forged_signal"} {
		m.BusRejected.WithLabelValues(reason)
	}
	return m
}

// Policy records a pool's policy events and its state after them.
func (m *Set) Policy(pool string, events []policy.Event, st policy.Status) {
	for _, e := range events {
		switch e := e.(type) {
		case policy.Crashed:
			m.EngineCrashes.WithLabelValues(pool, string(e.Reason)).Inc()
		case policy.RestartScheduled:
			m.BackoffDelay.WithLabelValues(pool, string(e.Reason)).Observe(e.Delay.Seconds())
			m.RestartsScheduled.WithLabelValues(pool, string(e.Reason)).Inc()
		case policy.BreakerChanged:
			if e.To == breaker.Open {
				m.BreakerOpens.WithLabelValues(pool, string(e.Class)).Inc()
			}
		case policy.StormDetected:
			m.RestartStorms.WithLabelValues(pool, string(e.Kind)).Inc()
		}
	}
	for c, s := range st.Breakers {
		m.BreakerState.WithLabelValues(pool, string(c)).Set(float64(s.State))
	}
	m.RestartRate.WithLabelValues(pool).Set(float64(st.RestartRate))
	m.Touch()
}

// SetPoolState marks state as the pool's one state.
func (m *Set) SetPoolState(pool string, state lifecycle.State) {
	for _, s := range lifecycle.States() {
		v := 0.0
		if s == state {
			v = 1
		}
		m.PoolState.WithLabelValues(pool, s.String()).Set(v)
	}
}

// Forget drops every series of a pool that is gone from the configuration.
func (m *Set) Forget(pool string) {
	l := prometheus.Labels{"pool_id": pool}
	for _, v := range []interface{ DeletePartialMatch(prometheus.Labels) int }{
		m.DrainDuration, m.Drains, m.DrainForceStops, m.ReloadDuration, m.ReloadSuccess, m.ReloadFailure,
		m.EngineCrashes, m.BackoffDelay, m.RestartsScheduled, m.BreakerOpens, m.BreakerState,
		m.RestartStorms, m.RestartRate, m.PoolReady, m.PoolLive, m.PoolDraining, m.PoolState, m.ActiveLeases,
		m.PoolInfo, m.HealthCheckFailures, m.IdleStops, m.LeaseStarts, m.Wakes, m.WakeDuration,
	} {
		v.DeletePartialMatch(l)
	}
}
