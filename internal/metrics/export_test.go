package metrics

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestExportWritesAndRetries(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg)
	m.InitPool("p")
	dir := filepath.Join(t.TempDir(), "missing")
	path := filepath.Join(dir, "pool-managerd.prom")
	logs := &syncBuffer{}
	log := slog.New(slog.NewTextHandler(logs, nil))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	done := make(chan struct{})
	go func() { m.Export(ctx, reg, path, time.Hour, "", log); close(done) }()
	defer func() { cancel(); <-done }()

	// The directory is missing: logged, not fatal, and tried again on
	// the next change.
	require.Eventually(t, func() bool { return strings.Contains(logs.String(), "will retry") }, 10*time.Second, 10*time.Millisecond)
	require.NoError(t, os.MkdirAll(dir, 0o755))
	m.PoolReady.WithLabelValues("p").Set(1)
	m.Touch()
	var fams map[string]*dtoFamily
	require.Eventually(t, func() bool {
		f, err := os.Open(path)
		if err != nil {
			return false
		}
		defer f.Close()
		p := expfmt.NewTextParser(model.UTF8Validation)
		parsed, err := p.TextToMetricFamilies(f)
		if err != nil {
			return false
		}
		fams = map[string]*dtoFamily{}
		for k, v := range parsed {
			fams[k] = &dtoFamily{n: len(v.GetMetric())}
		}
		return true
	}, 10*time.Second, 10*time.Millisecond)
	for _, name := range []string{
		"pool_managerd_drain_duration_seconds", "pool_managerd_drains_total", "pool_managerd_drain_force_stops_total",
		"pool_managerd_reload_duration_seconds", "pool_managerd_reload_success_total", "pool_managerd_reload_failure_total",
		"pool_managerd_engine_crashes_total", "pool_managerd_backoff_delay_seconds", "pool_managerd_restarts_scheduled_total",
		"pool_managerd_circuit_breaker_opens_total", "pool_managerd_circuit_breaker_state", "pool_managerd_restart_storms_total",
		"pool_managerd_restart_rate", "pool_managerd_pool_ready", "pool_managerd_pool_live", "pool_managerd_pool_draining",
		"pool_managerd_active_leases", "pool_managerd_health_check_failures_total", "pool_managerd_build_info",
		"pool_managerd_idle_stops_total", "pool_managerd_lease_starts_total", "pool_managerd_wakes_total",
		"pool_managerd_wake_duration_seconds",
	} {
		assert.Contains(t, fams, name)
	}
	assert.Contains(t, logs.String(), "metrics textfile written again")
}

type dtoFamily struct{ n int }

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestExportServesMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg)
	m.InitPool("p")
	m.PoolReady.WithLabelValues("p").Set(1)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	l.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { m.Export(ctx, reg, "", time.Hour, addr, slog.New(slog.DiscardHandler)); close(done) }()
	defer func() { cancel(); <-done }()
	var body []byte
	require.Eventually(t, func() bool {
		resp, err := http.Get("http://" + addr + "/metrics")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		body, _ = io.ReadAll(resp.Body)
		return resp.StatusCode == http.StatusOK
	}, 10*time.Second, 20*time.Millisecond)
	assert.Contains(t, string(body), `pool_managerd_pool_ready{pool_id="p"} 1`)
}
