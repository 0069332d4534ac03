package metrics

import (
	"bytes"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.yaml.in/yaml/v3"

	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/gpu"
)

const rulesFile = "../../packaging/pool-managerd.rules.yml"

type alertRule struct {
	Alert       string            `yaml:"alert"`
	Expr        string            `yaml:"expr"`
	For         string            `yaml:"for"`
	Labels      map[string]string `yaml:"labels"`
	Annotations map[string]string `yaml:"annotations"`
}

// shippedAlerts reads the rules file strictly: an unknown key is an error.
func shippedAlerts(t *testing.T) []alertRule {
	t.Helper()
	b, err := os.ReadFile(rulesFile)
	require.NoError(t, err)
	var file struct {
		Groups []struct {
			Name  string      `yaml:"name"`
			Rules []alertRule `yaml:"rules"`
		} `yaml:"groups"`
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	require.NoError(t, dec.Decode(&file))
	var rules []alertRule
	for _, g := range file.Groups {
		rules = append(rules, g.Rules...)
	}
	require.NotEmpty(t, rules, rulesFile)
	return rules
}

// exportedSeries is every series the daemon writes for a pool, and for an
// unhealthy GPU of each kind, gathered from the metrics' own registry.
func exportedSeries(t *testing.T, pool, gpuUUID string) []prometheus.Labels {
	t.Helper()
	reg := prometheus.NewRegistry()
	m := New(reg)
	m.InitPool(pool)
	m.PoolInfo.WithLabelValues(pool, "a.gguf", "b1", "0").Set(1)
	// A family with series only while something is wrong.
	for _, a := range []gpu.XIDAction{gpu.XIDReset, gpu.XIDLost} {
		m.GPUUnhealthy.WithLabelValues(gpuUUID, a.String()).Set(1)
	}
	// Families with series once something happened.
	for _, tied := range []string{"pool", "none", "device"} {
		m.GPUXIDs.WithLabelValues(gpuUUID, "31", tied).Inc()
	}
	for _, reason := range []string{"access_denied", "forged_signal"} {
		m.BusRejected.WithLabelValues(reason).Inc()
	}
	m.KernelLogReadable.WithLabelValues().Set(1)
	fams, err := reg.Gather()
	require.NoError(t, err)
	var series []prometheus.Labels
	for _, f := range fams {
		for _, s := range f.GetMetric() {
			l := prometheus.Labels{"__name__": f.GetName()}
			for _, p := range s.GetLabel() {
				l[p.GetName()] = p.GetValue()
			}
			series = append(series, l)
		}
	}
	return series
}

// The shipped alerting rules speak of metrics this daemon exports, each
// with a severity and a summary.
func TestAlertRulesUseExportedMetrics(t *testing.T) {
	known := map[string]bool{}
	for _, s := range exportedSeries(t, "p", "GPU-x") {
		known[s["__name__"]] = true
	}
	known[textfileMtime] = true
	alerts := map[string]bool{}
	name := regexp.MustCompile(`pool_managerd_[a-z_]+|` + textfileMtime)
	for _, r := range shippedAlerts(t) {
		alerts[r.Alert] = true
		assert.NotEmpty(t, r.Expr, r.Alert)
		assert.Contains(t, []string{"warning", "critical"}, r.Labels["severity"], r.Alert)
		assert.NotEmpty(t, r.Annotations["summary"], r.Alert)
		names := name.FindAllString(r.Expr, -1)
		require.NotEmpty(t, names, r.Alert)
		for _, n := range names {
			assert.True(t, known[n], "%s uses %s, which is not exported", r.Alert, n)
		}
	}
	for _, a := range []string{"PoolCircuitBreakerOpen", "PoolRestartStorm", "PoolNotReady", "PoolEngineOOM", "PoolEngineStalled", "GPUUnhealthy",
		"GPUForeignXID", "KernelLogUnreadable", "BusForgedSignals", "PoolManagerDown", "PoolStartOnDemandFailing", "PoolIdleFlapping", "PoolWakeFailed"} {
		assert.True(t, alerts[a], "alert %s", a)
	}
}

// textfileMtime is node_exporter's own word on our textfile: the one series
// that still changes once the daemon is gone.
const textfileMtime = "node_textfile_mtime_seconds"

// The dead-daemon alert watches the file the daemon writes by default
// (node_exporter labels it with its full path), and no other collector's.
func TestDeadDaemonAlertMatchesTheDefaultTextfileOnly(t *testing.T) {
	var expr string
	for _, r := range shippedAlerts(t) {
		if r.Alert == "PoolManagerDown" {
			expr = r.Expr
		}
	}
	require.NotEmpty(t, expr, "PoolManagerDown")
	m := regexp.MustCompile(`file=~"((?:[^"\\]|\\.)*)"`).FindStringSubmatch(expr)
	require.NotNil(t, m, "PoolManagerDown selects the file by a regular expression: %s", expr)
	// PromQL's string unescapes \\ to \; its regexp is anchored.
	re := regexp.MustCompile("^(?:" + strings.ReplaceAll(m[1], `\\`, `\`) + ")$")
	def := config.DefaultManager().MetricsTextfile
	require.NotEmpty(t, def)
	assert.True(t, re.MatchString(def), "the default textfile %s", def)
	assert.True(t, re.MatchString("/srv/textfiles/pool-managerd-gpu1.prom"))
	for _, other := range []string{"/var/lib/prometheus/node-exporter/apt.prom", "/var/lib/prometheus/node-exporter/pool-managerd.prom.d/x.prom", "/var/lib/prometheus/node-exporter/pool-managerd.prom.tmp"} {
		assert.False(t, re.MatchString(other), other)
	}
}
