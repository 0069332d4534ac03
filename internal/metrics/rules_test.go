package metrics

import (
	"bytes"
	"os"
	"regexp"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.yaml.in/yaml/v3"
)

// The shipped alerting rules parse as Prometheus rule groups and speak of
// metrics this daemon exports.
func TestAlertRules(t *testing.T) {
	b, err := os.ReadFile("../../packaging/pool-managerd.rules.yml")
	require.NoError(t, err)
	var file struct {
		Groups []struct {
			Name  string `yaml:"name"`
			Rules []struct {
				Alert       string            `yaml:"alert"`
				Expr        string            `yaml:"expr"`
				For         string            `yaml:"for"`
				Labels      map[string]string `yaml:"labels"`
				Annotations map[string]string `yaml:"annotations"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	require.NoError(t, dec.Decode(&file))
	reg := prometheus.NewRegistry()
	m := New(reg)
	m.InitPool("p")
	// A family with series only while something is wrong.
	m.GPUUnhealthy.WithLabelValues("GPU-x", "reset").Set(1)
	fams, err := reg.Gather()
	require.NoError(t, err)
	known := map[string]bool{}
	for _, f := range fams {
		known[f.GetName()] = true
	}
	alerts := map[string]bool{}
	name := regexp.MustCompile(`pool_managerd_[a-z_]+`)
	for _, g := range file.Groups {
		for _, r := range g.Rules {
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
	}
	for _, a := range []string{"PoolCircuitBreakerOpen", "PoolRestartStorm", "PoolNotReady", "PoolEngineOOM"} {
		assert.True(t, alerts[a], "alert %s", a)
	}
}
