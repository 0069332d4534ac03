package metrics

import (
	"context"
	"maps"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.yaml.in/yaml/v3"
)

// ruleTests are promtool's unit tests of the shipped rules; the file names
// the rules by a path relative to itself.
const ruleTests = "testdata/pool-managerd.rules.test.yml"

// runPromtool runs Debian's promtool and returns what it said. Its absence
// fails the test: skipped, the shipped rules would go unchecked without
// anyone noticing.
func runPromtool(t *testing.T, args ...string) (string, error) {
	t.Helper()
	path, err := exec.LookPath("promtool")
	require.NoError(t, err, "promtool is missing: install Debian's prometheus package "+
		"(apt-get install --no-install-recommends prometheus; make test does, as root)")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, args...).CombinedOutput()
	return string(out), err
}

// promtool runs promtool, which must succeed.
func promtool(t *testing.T, args ...string) string {
	t.Helper()
	out, err := runPromtool(t, args...)
	require.NoError(t, err, "promtool %s:\n%s", strings.Join(args, " "), out)
	return out
}

func TestPromtoolAcceptsTheShippedRules(t *testing.T) {
	out := promtool(t, "check", "rules", rulesFile)
	assert.Contains(t, out, "SUCCESS: "+strconv.Itoa(len(shippedAlerts(t)))+" rules found")
}

func TestShippedAlertsFireAndStaySilentAsPromtoolUnitTestsSay(t *testing.T) {
	out := promtool(t, "test", "rules", ruleTests)
	assert.Contains(t, out, "SUCCESS")
}

type ruleTestFile struct {
	RuleFiles          []string `yaml:"rule_files"`
	EvaluationInterval string   `yaml:"evaluation_interval"`
	Tests              []struct {
		Name        string `yaml:"name"`
		Interval    string `yaml:"interval"`
		InputSeries []struct {
			Series string `yaml:"series"`
			Values string `yaml:"values"`
		} `yaml:"input_series"`
		AlertRuleTest []struct {
			EvalTime  string `yaml:"eval_time"`
			Alertname string `yaml:"alertname"`
			ExpAlerts []struct {
				ExpLabels      map[string]string `yaml:"exp_labels"`
				ExpAnnotations map[string]string `yaml:"exp_annotations"`
			} `yaml:"exp_alerts"`
		} `yaml:"alert_rule_test"`
	} `yaml:"tests"`
}

func readRuleTests(t *testing.T) ruleTestFile {
	t.Helper()
	b, err := os.ReadFile(ruleTests)
	require.NoError(t, err)
	var f ruleTestFile
	require.NoError(t, yaml.Unmarshal(b, &f))
	require.Equal(t, []string{"../" + rulesFile}, f.RuleFiles, "the unit tests test the shipped rules")
	return f
}

// An alert without a case that fires could be dead; one without a case
// that stays silent could fire always.
func TestEveryShippedAlertHasAPromtoolCaseThatFiresAndOneThatStaysSilent(t *testing.T) {
	fires, silent := map[string]bool{}, map[string]bool{}
	for _, tc := range readRuleTests(t).Tests {
		for _, a := range tc.AlertRuleTest {
			if len(a.ExpAlerts) > 0 {
				fires[a.Alertname] = true
				for _, e := range a.ExpAlerts {
					assert.NotEmpty(t, e.ExpAnnotations["summary"], "%s: %s: the summary as rendered", tc.Name, a.Alertname)
				}
			} else {
				silent[a.Alertname] = true
			}
		}
	}
	for _, r := range shippedAlerts(t) {
		assert.True(t, fires[r.Alert], "no promtool case in which %s fires", r.Alert)
		assert.True(t, silent[r.Alert], "no promtool case in which %s stays silent", r.Alert)
	}
}

var (
	seriesSyntax = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)\{((?:[a-zA-Z_][a-zA-Z0-9_]*="[^"]*",?)*)\}$`)
	labelSyntax  = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"`)
)

// seriesKey names a series by its name and labels, with the values that
// differ per host (pool, GPU and the XIDs it raised) left out.
func seriesKey(l prometheus.Labels) string {
	var parts []string
	for k, v := range l {
		if k == "pool_id" || k == "gpu_uuid" || k == "xid" {
			v = "*"
		}
		parts = append(parts, k+"="+v)
	}
	slices.Sort(parts)
	return strings.Join(parts, ",")
}

// The unit tests feed the rules what Prometheus stores from our textfile:
// a series the daemon writes (its name, label names and label values such
// as reason, class and kind), plus the scrape's instance and job. A test
// on a made-up label would pass while the real alert never fires.
func TestPromtoolInputSeriesAreTheDaemonsOwn(t *testing.T) {
	exported := map[string]bool{}
	for _, s := range exportedSeries(t, "p", "GPU-x") {
		exported[seriesKey(s)] = true
	}
	for _, tc := range readRuleTests(t).Tests {
		for _, in := range tc.InputSeries {
			m := seriesSyntax.FindStringSubmatch(in.Series)
			require.NotNil(t, m, "%s: series %s", tc.Name, in.Series)
			l := prometheus.Labels{"__name__": m[1]}
			for _, p := range labelSyntax.FindAllStringSubmatch(m[2], -1) {
				l[p[1]] = p[2]
			}
			for _, scrape := range []string{"instance", "job"} {
				assert.NotEmpty(t, l[scrape], "%s: %s has no %s label, which every scraped series has", tc.Name, in.Series, scrape)
				delete(l, scrape)
			}
			if l["__name__"] == textfileMtime {
				// node_exporter's own series about our file: its one label.
				assert.Equal(t, []string{"__name__", "file"}, slices.Sorted(maps.Keys(l)), "%s: %s", tc.Name, in.Series)
				continue
			}
			assert.True(t, exported[seriesKey(l)], "%s: the daemon writes no series like %s", tc.Name, in.Series)
		}
	}
}
