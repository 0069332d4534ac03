package metrics

import (
	"context"
	"log/slog"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/llorch/pool-managerd/internal/crash"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/storm"
)

// ReloadFailureReasons are the reason label values of reload failures.
var ReloadFailureReasons = []string{"invalid_model", "drain_timeout", "stage", "crash", "health", "start_timeout"}

// InitPool creates every series of a pool at zero, so that a dashboard or
// an alert on rate() sees the pool before its first event.
func (m *Set) InitPool(pool string) {
	for _, o := range []string{"drained", "forced"} {
		m.Drains.WithLabelValues(pool, o)
		m.DrainDuration.WithLabelValues(pool, o)
	}
	m.DrainForceStops.WithLabelValues(pool)
	m.IdleStops.WithLabelValues(pool)
	m.LeaseStarts.WithLabelValues(pool)
	for _, r := range []string{"ok", "failed"} {
		m.Wakes.WithLabelValues(pool, r)
	}
	m.WakeDuration.WithLabelValues(pool)
	for _, o := range []string{"success", "failure"} {
		m.ReloadDuration.WithLabelValues(pool, o)
	}
	m.ReloadSuccess.WithLabelValues(pool)
	for _, r := range ReloadFailureReasons {
		m.ReloadFailure.WithLabelValues(pool, r)
	}
	for _, r := range crash.Reasons {
		m.EngineCrashes.WithLabelValues(pool, string(r))
		m.RestartsScheduled.WithLabelValues(pool, string(r))
		m.BackoffDelay.WithLabelValues(pool, string(r))
	}
	for _, c := range append([]crash.Class{crash.ClassGeneral}, crash.Classes...) {
		m.BreakerOpens.WithLabelValues(pool, string(c))
		m.BreakerState.WithLabelValues(pool, string(c))
	}
	for _, k := range []storm.Kind{storm.ProcessStorm, storm.OOMStorm, storm.HealthStorm, storm.CUDAStorm, storm.StartStorm, storm.MixedStorm} {
		m.RestartStorms.WithLabelValues(pool, string(k))
	}
	m.RestartRate.WithLabelValues(pool)
	m.SetPoolState(pool, lifecycle.Stopped)
	m.PoolReady.WithLabelValues(pool)
	m.PoolLive.WithLabelValues(pool)
	m.PoolDraining.WithLabelValues(pool)
	m.ActiveLeases.WithLabelValues(pool)
	m.HealthCheckFailures.WithLabelValues(pool)
	m.Touch()
}

// Touch says the values changed: the textfile is rewritten soon.
func (m *Set) Touch() {
	select {
	case m.touched <- struct{}{}:
	default:
	}
}

// Export writes the registry to path (node_exporter's textfile collector
// reads it) on every change and every interval, atomically; a failed
// write is logged and tried again, never fatal. With listen set it also
// serves /metrics there. It returns when ctx ends.
func (m *Set) Export(ctx context.Context, g prometheus.Gatherer, path string, every time.Duration, listen string, log *slog.Logger) {
	if listen != "" {
		srv := &http.Server{Addr: listen, Handler: promhttp.HandlerFor(g, promhttp.HandlerOpts{}), ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := srv.ListenAndServe(); err != nil && err != http.ErrServerClosed {
				log.Error("metrics listener failed", journal.Error, err.Error())
			}
		}()
		go func() {
			<-ctx.Done()
			srv.Close()
		}()
	}
	if path == "" {
		return
	}
	t := time.NewTicker(every)
	defer t.Stop()
	lastErr := ""
	for {
		if err := writeTextfile(path, g); err != nil {
			// Once per distinct error: a full disk must not flood the
			// journal.
			if err.Error() != lastErr {
				log.Error("writing the metrics textfile failed (will retry)", journal.Error, err.Error())
				lastErr = err.Error()
			}
		} else if lastErr != "" {
			log.Info("metrics textfile written again: " + path)
			lastErr = ""
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-m.touched:
			// Coalesce a burst of changes into one write.
			select {
			case <-ctx.Done():
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
}
