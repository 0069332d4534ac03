package bus_test

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/crash"
	"github.com/llorch/pool-managerd/internal/metrics"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
)

// nodeExporter is Debian's name for node_exporter.
const nodeExporter = "prometheus-node-exporter"

// registered records the families metrics.New registers, so that the
// families a scrape must show come from the daemon's code, not a list.
type registered struct{ names []string }

var fqName = regexp.MustCompile(`fqName: "([^"]+)"`)

func (r *registered) Register(c prometheus.Collector) error {
	ch := make(chan *prometheus.Desc, 16)
	go func() { c.Describe(ch); close(ch) }()
	for d := range ch {
		if m := fqName.FindStringSubmatch(d.String()); m != nil {
			r.names = append(r.names, m[1])
		}
	}
	return nil
}

func (r *registered) MustRegister(cs ...prometheus.Collector) {
	for _, c := range cs {
		r.Register(c)
	}
}

func (r *registered) Unregister(prometheus.Collector) bool { return false }

// sampleValue is the value of name's series with exactly the labels want:
// a counter's or gauge's value, a histogram's count.
func sampleValue(fams map[string]*dto.MetricFamily, name string, want map[string]string) (float64, bool) {
	f, ok := fams[name]
	if !ok {
		return 0, false
	}
next:
	for _, m := range f.GetMetric() {
		if len(m.GetLabel()) != len(want) {
			continue
		}
		for _, l := range m.GetLabel() {
			if v, ok := want[l.GetName()]; !ok || v != l.GetValue() {
				continue next
			}
		}
		switch f.GetType() {
		case dto.MetricType_COUNTER:
			return m.GetCounter().GetValue(), true
		case dto.MetricType_GAUGE:
			return m.GetGauge().GetValue(), true
		case dto.MetricType_HISTOGRAM:
			return float64(m.GetHistogram().GetSampleCount()), true
		default:
			return m.GetUntyped().GetValue(), true
		}
	}
	return 0, false
}

// startNodeExporter runs Debian's node_exporter with only its textfile
// collector on dir, bounded in time and killed at cleanup; it returns
// its /metrics URL.
func startNodeExporter(t *testing.T, bin, dir string) string {
	t.Helper()
	addr := "127.0.0.1:" + strconv.Itoa(freePort(t))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	var out lockedBuffer
	cmd := exec.CommandContext(ctx, bin, "--collector.disable-defaults", "--collector.textfile",
		"--collector.textfile.directory="+dir, "--web.listen-address="+addr)
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = 5 * time.Second
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		cancel()
		cmd.Wait()
		if t.Failed() {
			t.Logf("%s said:\n%s", bin, out.String())
		}
	})
	return "http://" + addr + "/metrics"
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// scrape reads url's metrics in the text format, as Prometheus would.
func scrape(url string) (map[string]*dto.MetricFamily, error) {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	return p.TextToMetricFamilies(resp.Body)
}

// Debian's node_exporter reads the daemon's textfile after crashes, a
// drain and a reload: every family the daemon registers is in its
// /metrics with the counts of what happened, and the textfile collector
// reports no error.
func TestNodeExporterServesEveryFamilyAfterCrashesADrainAndAReload(t *testing.T) {
	sandbox.Need(t)
	bin, err := exec.LookPath(nodeExporter)
	require.NoError(t, err, "node_exporter is missing: install Debian's prometheus-node-exporter package "+
		"(apt-get install --no-install-recommends prometheus-node-exporter; make test does, as root)")
	dir, port := daemon(t)
	const pool = "llama-8b"
	waitProp(t, pool, "Ready", "b true")

	for n, fault := range []string{"segv", "exit:3"} {
		resp, err := http.Post(fmt.Sprintf("http://127.0.0.1:%d/sim/fault?kind=%s", port, fault), "", nil)
		require.NoError(t, err)
		resp.Body.Close()
		waitProp(t, pool, "CrashCount", "u "+strconv.Itoa(n+1))
		waitProp(t, pool, "Ready", "b true")
	}
	out, err := call("Drain", "st", pool, "10000")
	require.NoError(t, err, out)
	require.Equal(t, `s "drained"`, out)
	out, err = call("Start", "s", pool)
	require.NoError(t, err, out)
	waitProp(t, pool, "Ready", "b true")
	out, err = call("Reload", "sst", pool, "b.gguf", "10000")
	require.NoError(t, err, out)
	require.Equal(t, `s "b.gguf"`, out)

	url := startNodeExporter(t, bin, filepath.Join(dir, "metrics"))
	var fams map[string]*dto.MetricFamily
	require.Eventually(t, func() bool {
		fams, err = scrape(url)
		v, _ := sampleValue(fams, "pool_managerd_reload_success_total", map[string]string{"pool_id": pool})
		return err == nil && v == 1
	}, 20*time.Second, 100*time.Millisecond, "node_exporter serves the textfile with the reload counted (last error: %v)", err)

	v, ok := sampleValue(fams, "node_textfile_scrape_error", map[string]string{})
	require.True(t, ok, "node_textfile_scrape_error is served")
	assert.Equal(t, 0.0, v, "the textfile collector read our file without error")
	_, ok = sampleValue(fams, "node_textfile_mtime_seconds", map[string]string{"file": filepath.Join(dir, "metrics", "pool-managerd.prom")})
	assert.True(t, ok, "node_exporter read pool-managerd.prom itself")

	var reg registered
	metrics.New(&reg)
	require.NotEmpty(t, reg.names)
	// Series only while a GPU needs a reset or is lost, or once an XID
	// came; there is none here.
	// The kernel log's readability is said on NVML hosts only.
	onlyWhileWrong := map[string]bool{"pool_managerd_gpu_unhealthy": true, "pool_managerd_gpu_xids_total": true, "pool_managerd_kernel_log_readable": true,
		// Swaps are counted for a Group= only.
		"pool_managerd_group_swaps_total": true, "pool_managerd_group_swap_duration_seconds": true}
	for _, name := range reg.names {
		_, served := fams[name]
		if onlyWhileWrong[name] {
			assert.False(t, served, "%s while no GPU is unhealthy", name)
			continue
		}
		assert.True(t, served, "node_exporter serves %s", name)
	}

	p := map[string]string{"pool_id": pool}
	with := func(k, v string) map[string]string { return map[string]string{"pool_id": pool, k: v} }
	for _, c := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"pool_managerd_engine_crashes_total", with("reason", string(crash.Signal)), 1},
		{"pool_managerd_engine_crashes_total", with("reason", string(crash.ExitCode)), 1},
		{"pool_managerd_engine_crashes_total", with("reason", string(crash.OutOfMemory)), 0},
		{"pool_managerd_restarts_scheduled_total", with("crash_reason", string(crash.Signal)), 1},
		{"pool_managerd_restarts_scheduled_total", with("crash_reason", string(crash.ExitCode)), 1},
		{"pool_managerd_backoff_delay_seconds", with("crash_reason", string(crash.Signal)), 1},
		{"pool_managerd_drains_total", with("outcome", "drained"), 1},
		{"pool_managerd_drains_total", with("outcome", "forced"), 0},
		{"pool_managerd_drain_duration_seconds", with("outcome", "drained"), 1},
		{"pool_managerd_drain_force_stops_total", p, 0},
		{"pool_managerd_reload_success_total", p, 1},
		{"pool_managerd_reload_duration_seconds", with("outcome", "success"), 1},
		{"pool_managerd_reload_duration_seconds", with("outcome", "failure"), 0},
		{"pool_managerd_reload_failure_total", with("reason", "health"), 0},
		{"pool_managerd_circuit_breaker_state", with("class", string(crash.ClassGeneral)), 0},
		{"pool_managerd_restart_storms_total", with("kind", "process_storm"), 0},
		{"pool_managerd_pool_ready", p, 1},
		{"pool_managerd_pool_live", p, 1},
		{"pool_managerd_pool_draining", p, 0},
		{"pool_managerd_pool_state", with("state", "ready"), 1},
		{"pool_managerd_pool_state", with("state", "stopped"), 0},
		{"pool_managerd_pool_state", with("state", "backoff"), 0},
		{"pool_managerd_active_leases", p, 0},
		{"pool_managerd_pool_info", map[string]string{"pool_id": pool, "model": "b.gguf", "engine_version": "sim-1", "device_mask": "0"}, 1},
	} {
		v, ok := sampleValue(fams, c.name, c.labels)
		if assert.True(t, ok, "%s%v is served", c.name, c.labels) {
			assert.Equal(t, c.want, v, "%s%v", c.name, c.labels)
		}
	}
}
