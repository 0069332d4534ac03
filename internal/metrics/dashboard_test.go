package metrics

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.yaml.in/yaml/v3"
)

const dashboardFile = "../../packaging/pool-managerd.dashboard.json"

// What the dashboard's variables stand for when its queries are checked.
const (
	dashInstance = "host-1:9100"
	dashPool     = "pool-1"
)

type dashDatasource struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

type dashTarget struct {
	RefID        string          `json:"refId"`
	Expr         string          `json:"expr"`
	LegendFormat string          `json:"legendFormat"`
	Datasource   *dashDatasource `json:"datasource"`
}

type dashPanel struct {
	ID         int             `json:"id"`
	Type       string          `json:"type"`
	Title      string          `json:"title"`
	Datasource *dashDatasource `json:"datasource"`
	GridPos    struct {
		H int `json:"h"`
		W int `json:"w"`
		X int `json:"x"`
		Y int `json:"y"`
	} `json:"gridPos"`
	Targets     []dashTarget `json:"targets"`
	Panels      []dashPanel  `json:"panels"`
	FieldConfig struct {
		Defaults struct {
			Mappings []struct {
				Type    string `json:"type"`
				Options map[string]struct {
					Text string `json:"text"`
				} `json:"options"`
			} `json:"mappings"`
		} `json:"defaults"`
	} `json:"fieldConfig"`
}

type dashVariable struct {
	Name       string          `json:"name"`
	Type       string          `json:"type"`
	Datasource *dashDatasource `json:"datasource"`
	Query      json.RawMessage `json:"query"`
	Definition string          `json:"definition"`
}

type dashboard struct {
	UID           string      `json:"uid"`
	Title         string      `json:"title"`
	SchemaVersion int         `json:"schemaVersion"`
	Panels        []dashPanel `json:"panels"`
	Templating    struct {
		List []dashVariable `json:"list"`
	} `json:"templating"`
}

// parseDashboard refuses what Grafana might half-read: bad syntax, a key
// given twice (the last silently wins), data after the object, or a
// field of the wrong type.
func parseDashboard(b []byte) (dashboard, error) {
	var d dashboard
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dashNoDuplicateKeys(dec, "$"); err != nil {
		return d, err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return d, fmt.Errorf("data after the dashboard object (at byte %d)", dec.InputOffset())
	}
	if err := json.Unmarshal(b, &d); err != nil {
		return d, err
	}
	return d, nil
}

func dashNoDuplicateKeys(dec *json.Decoder, path string) error {
	tok, err := dec.Token()
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	switch tok {
	case json.Delim('{'):
		seen := map[string]bool{}
		for dec.More() {
			k, err := dec.Token()
			if err != nil {
				return fmt.Errorf("%s: %w", path, err)
			}
			key := k.(string)
			if seen[key] {
				return fmt.Errorf("%s: key %q given twice", path, key)
			}
			seen[key] = true
			if err := dashNoDuplicateKeys(dec, path+"."+key); err != nil {
				return err
			}
		}
		_, err = dec.Token()
	case json.Delim('['):
		for i := 0; dec.More(); i++ {
			if err := dashNoDuplicateKeys(dec, fmt.Sprintf("%s[%d]", path, i)); err != nil {
				return err
			}
		}
		_, err = dec.Token()
	}
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

func readDashboard(t *testing.T) (dashboard, []byte) {
	t.Helper()
	b, err := os.ReadFile(dashboardFile)
	require.NoError(t, err)
	d, err := parseDashboard(b)
	require.NoError(t, err, dashboardFile)
	return d, b
}

// dashQuery is one PromQL expression of the dashboard and where it is.
type dashQuery struct {
	where  string
	record string // its name as a recording rule for promtool
	expr   string
	legend string
	// panel: a panel's target, which must follow the dashboard's
	// instance and pool selection.
	panel bool
	// label: a label_values variable's label.
	label string
}

func dashQueries(t *testing.T, d dashboard) []dashQuery {
	t.Helper()
	var qs []dashQuery
	var walk func([]dashPanel)
	walk = func(ps []dashPanel) {
		for _, p := range ps {
			for _, tg := range p.Targets {
				qs = append(qs, dashQuery{
					where:  fmt.Sprintf("panel %d %q target %s", p.ID, p.Title, tg.RefID),
					record: fmt.Sprintf("dashboard:panel_%d:%s", p.ID, tg.RefID),
					expr:   tg.Expr, legend: tg.LegendFormat, panel: true,
				})
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		q := dashVariableQuery(t, v)
		m := labelValuesCall.FindStringSubmatch(q)
		require.NotNil(t, m, "variable %s: want label_values(METRIC{...}, LABEL), got %q", v.Name, q)
		qs = append(qs, dashQuery{
			where:  fmt.Sprintf("variable %s", v.Name),
			record: "dashboard:variable_" + v.Name,
			expr:   m[1], label: m[2],
		})
	}
	return qs
}

var labelValuesCall = regexp.MustCompile(`^\s*label_values\(\s*(.+)\s*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*$`)

// dashVariableQuery reads a variable's query in either of Grafana's
// forms: a string, or an object with a query field.
func dashVariableQuery(t *testing.T, v dashVariable) string {
	t.Helper()
	var s string
	if json.Unmarshal(v.Query, &s) == nil {
		return s
	}
	var o struct {
		Query string `json:"query"`
	}
	require.NoError(t, json.Unmarshal(v.Query, &o), "variable %s: query", v.Name)
	return o.Query
}

var dashVariableRef = regexp.MustCompile(`\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]`)

// dashSubstitute gives the variables concrete values, as Grafana does
// before it sends a query.
func dashSubstitute(expr string) (string, error) {
	var unknown []string
	out := dashVariableRef.ReplaceAllStringFunc(expr, func(ref string) string {
		m := dashVariableRef.FindStringSubmatch(ref)
		switch name := m[1] + m[2] + m[3]; name {
		case "instance":
			return dashInstance
		case "pool_id":
			return dashPool
		case "__rate_interval", "__interval", "__range":
			return "5m"
		default:
			unknown = append(unknown, ref)
			return ref
		}
	})
	if len(unknown) > 0 {
		return "", fmt.Errorf("unknown variable %s", strings.Join(unknown, ", "))
	}
	return out, nil
}

// dashSeries maps each series name the daemon exports to the labels it
// carries: every family of Set gets one series with every label, so a
// family added later is known without touching this test.
func dashSeries(t *testing.T) map[string]map[string]bool {
	t.Helper()
	reg := prometheus.NewRegistry()
	m := New(reg)
	families := 0
	v := reflect.ValueOf(m).Elem()
	for i := 0; i < v.NumField(); i++ {
		f := v.Field(i)
		if !f.CanInterface() {
			continue
		}
		if _, ok := f.Interface().(prometheus.Collector); !ok {
			continue
		}
		families++
		get := f.MethodByName("GetMetricWithLabelValues")
		require.True(t, get.IsValid(), "Set.%s: a vector", v.Type().Field(i).Name)
		made := false
		for n := 0; n <= 8 && !made; n++ {
			values := make([]string, n)
			for j := range values {
				values[j] = "x"
			}
			out := get.CallSlice([]reflect.Value{reflect.ValueOf(values)})
			made = out[1].IsNil()
		}
		require.True(t, made, "Set.%s: no series made", v.Type().Field(i).Name)
	}
	fams, err := reg.Gather()
	require.NoError(t, err)
	require.Len(t, fams, families, "every family of Set gathered")
	series := map[string]map[string]bool{}
	for _, f := range fams {
		labels := map[string]bool{"instance": true, "job": true}
		for _, p := range f.GetMetric()[0].GetLabel() {
			labels[p.GetName()] = true
		}
		if f.GetType() == dto.MetricType_HISTOGRAM {
			bucket := map[string]bool{"le": true}
			for l := range labels {
				bucket[l] = true
			}
			series[f.GetName()+"_bucket"] = bucket
			series[f.GetName()+"_sum"] = labels
			series[f.GetName()+"_count"] = labels
			continue
		}
		series[f.GetName()] = labels
	}
	return series
}

type dashToken struct {
	kind byte // i: identifier, s: string, n: number or duration, p: punctuation
	text string
}

func (t dashToken) is(kind byte, text string) bool { return t.kind == kind && t.text == text }

func dashLex(expr string) ([]dashToken, error) {
	var toks []dashToken
	isIdent := func(c byte, first bool) bool {
		return c == '_' || c == ':' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || !first && c >= '0' && c <= '9'
	}
	for i := 0; i < len(expr); {
		c := expr[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			i++
		case c == '#':
			for i < len(expr) && expr[i] != '\n' {
				i++
			}
		case isIdent(c, true):
			j := i + 1
			for j < len(expr) && isIdent(expr[j], false) {
				j++
			}
			toks = append(toks, dashToken{'i', expr[i:j]})
			i = j
		case c >= '0' && c <= '9' || c == '.':
			j := i + 1
			for j < len(expr) && (isIdent(expr[j], false) || expr[j] == '.') {
				j++
			}
			toks = append(toks, dashToken{'n', expr[i:j]})
			i = j
		case c == '"' || c == '\'' || c == '`':
			j := i + 1
			for j < len(expr) && expr[j] != c {
				if expr[j] == '\\' && c != '`' {
					j++
				}
				j++
			}
			if j >= len(expr) {
				return nil, fmt.Errorf("unterminated string at %d", i)
			}
			toks = append(toks, dashToken{'s', expr[i+1 : j]})
			i = j + 1
		default:
			n := 1
			if i+1 < len(expr) && slices.Contains([]string{"=~", "!~", "!=", "==", "<=", ">="}, expr[i:i+2]) {
				n = 2
			}
			toks = append(toks, dashToken{'p', expr[i : i+n]})
			i += n
		}
	}
	return toks, nil
}

var dashKeywords = map[string]bool{
	"by": true, "without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true,
	"bool": true, "and": true, "or": true, "unless": true, "offset": true, "inf": true, "nan": true,
}

var dashLegendLabel = regexp.MustCompile(`\{\{\s*([^}\s]*)\s*\}\}`)

// dashCheck lists what is wrong with one query: series the daemon does not
// export, labels their families do not carry (in matchers, grouping
// clauses, the legend and a variable's label), a legend label the
// outermost aggregation drops, and a panel's selector that ignores the
// dashboard's instance or pool selection. Validity as PromQL is promtool's.
func dashCheck(q dashQuery, series map[string]map[string]bool) []string {
	var findings []string
	bad := func(format string, args ...any) {
		findings = append(findings, q.where+": "+fmt.Sprintf(format, args...))
	}
	expr, err := dashSubstitute(q.expr)
	if err != nil {
		bad("%v", err)
		return findings
	}
	toks, err := dashLex(expr)
	if err != nil {
		bad("%v", err)
		return findings
	}
	if len(toks) == 0 {
		bad("no expression")
		return findings
	}
	// match[i] is the index of the bracket that closes or opens toks[i].
	match := map[int]int{}
	depth := make([]int, len(toks))
	var open []int
	for i, tk := range toks {
		depth[i] = len(open)
		if tk.kind != 'p' {
			continue
		}
		switch tk.text {
		case "(", "{", "[":
			open = append(open, i)
		case ")", "}", "]":
			if len(open) == 0 {
				bad("unbalanced %s", tk.text)
				return findings
			}
			match[i], match[open[len(open)-1]] = open[len(open)-1], i
			open = open[:len(open)-1]
		}
	}
	if len(open) > 0 {
		bad("unbalanced %s", toks[open[0]].text)
		return findings
	}

	carries := func(name, label string) bool { return series[name][label] }
	type selector struct {
		at       int
		name     string
		known    bool
		matchers map[string][2]string // label -> op, value
	}
	var sels []selector
	type grouping struct {
		depth    int
		keyword  string
		labels   []string
		from, to int // the token range it applies to
	}
	var groups []grouping
	for i := 0; i < len(toks); i++ {
		tk := toks[i]
		next := func(k int) dashToken {
			if i+k < len(toks) {
				return toks[i+k]
			}
			return dashToken{}
		}
		if tk.kind == 'p' && tk.text == "{" {
			bad("a selector without a metric name")
			i = match[i]
			continue
		}
		if tk.kind != 'i' {
			continue
		}
		if dashKeywords[tk.text] {
			if !slices.Contains([]string{"by", "without", "on", "ignoring", "group_left", "group_right"}, tk.text) || !next(1).is('p', "(") {
				continue
			}
			g := grouping{depth: depth[i], keyword: tk.text, from: 0, to: len(toks) - 1}
			end := match[i+1]
			for _, l := range toks[i+2 : end] {
				if l.kind == 'i' {
					g.labels = append(g.labels, l.text)
				}
			}
			if tk.text == "by" || tk.text == "without" {
				switch {
				case i > 0 && toks[i-1].is('p', ")"):
					g.from, g.to = match[i-1], i-1
				case end+1 < len(toks) && toks[end+1].is('p', "("):
					g.from, g.to = end+1, match[end+1]
				default:
					bad("%s (...) is not attached to an aggregation", tk.text)
				}
			}
			groups = append(groups, g)
			i = end
			continue
		}
		if n := next(1); n.is('p', "(") || n.is('i', "by") || n.is('i', "without") {
			continue // a function or an aggregation
		}
		s := selector{at: i, name: tk.text, matchers: map[string][2]string{}}
		_, s.known = series[s.name]
		if !s.known {
			bad("%s is not a series the daemon exports", s.name)
		}
		if next(1).is('p', "{") {
			end := match[i+1]
			for j := i + 2; j < end; j++ {
				if toks[j].kind != 'i' || j+2 >= end || toks[j+1].kind != 'p' || toks[j+2].kind != 's' {
					bad("%s: unreadable matchers", s.name)
					break
				}
				s.matchers[toks[j].text] = [2]string{toks[j+1].text, toks[j+2].text}
				j += 2
				if j+1 < end && toks[j+1].is('p', ",") {
					j++
				}
			}
			for l := range s.matchers {
				if s.known && !carries(s.name, l) {
					bad("%s has no label %s (matcher)", s.name, l)
				}
			}
			i = end
		}
		sels = append(sels, s)
	}
	if len(sels) == 0 {
		bad("names no series of the daemon")
		return findings
	}

	// Labels are checked on the series that exist; the others are
	// findings already.
	within := func(from, to int) []string {
		var names []string
		for _, s := range sels {
			if s.known && s.at >= from && s.at <= to {
				names = append(names, s.name)
			}
		}
		return names
	}
	all := within(0, len(toks))
	carriedByAll := func(names []string, label string) bool {
		for _, n := range names {
			if !carries(n, label) {
				return false
			}
		}
		return true
	}
	for _, g := range groups {
		names := within(g.from, g.to)
		for _, l := range g.labels {
			switch g.keyword {
			case "group_left", "group_right":
				if len(all) > 0 && !slices.ContainsFunc(all, func(n string) bool { return carries(n, l) }) {
					bad("%s (%s): no series here has label %s", g.keyword, l, l)
				}
			default:
				if !carriedByAll(names, l) {
					bad("%s (%s): not every one of %s has label %s", g.keyword, strings.Join(g.labels, ", "), strings.Join(names, ", "), l)
				}
			}
		}
	}

	// The outermost by/without says which labels the result keeps.
	var outer *grouping
	for k := range groups {
		g := &groups[k]
		if (g.keyword == "by" || g.keyword == "without") && (outer == nil || g.depth < outer.depth) {
			outer = g
		}
	}
	for _, m := range dashLegendLabel.FindAllStringSubmatch(q.legend, -1) {
		l := m[1]
		switch {
		case !carriedByAll(all, l):
			bad("legend {{%s}}: not every one of %s has label %s", l, strings.Join(all, ", "), l)
		case outer != nil && outer.keyword == "by" && !slices.Contains(outer.labels, l):
			bad("legend {{%s}}: the result keeps only %s", l, strings.Join(outer.labels, ", "))
		case outer != nil && outer.keyword == "without" && slices.Contains(outer.labels, l):
			bad("legend {{%s}}: the result drops it", l)
		}
	}
	if q.label != "" && !carriedByAll(all, q.label) {
		bad("label_values of %s: not every one of %s has it", q.label, strings.Join(all, ", "))
	}

	if q.panel {
		for _, s := range sels {
			if !s.known {
				continue
			}
			want := map[string]string{"instance": dashInstance}
			if carries(s.name, "pool_id") {
				want["pool_id"] = dashPool
			}
			for l, v := range want {
				if got := s.matchers[l]; got != [2]string{"=~", v} {
					bad(`%s does not follow the %s variable: want %s=~"$%s"`, s.name, l, l, l)
				}
			}
		}
	}
	return findings
}

// dashPromtool checks the expressions as recording rules of a rules file:
// promtool parses each with Prometheus' own PromQL parser.
func dashPromtool(t *testing.T, qs []dashQuery) (string, error) {
	t.Helper()
	type rule struct {
		Record string `yaml:"record"`
		Expr   string `yaml:"expr"`
	}
	var rules []rule
	for _, q := range qs {
		expr, err := dashSubstitute(q.expr)
		require.NoError(t, err, q.where)
		rules = append(rules, rule{q.record, expr})
	}
	b, err := yaml.Marshal(map[string]any{"groups": []any{map[string]any{"name": "dashboard", "rules": rules}}})
	require.NoError(t, err)
	file := filepath.Join(t.TempDir(), "dashboard.rules.yml")
	require.NoError(t, os.WriteFile(file, b, 0o644))
	return runPromtool(t, "check", "rules", "--lint=none", file)
}

// Every query of the dashboard names series the daemon exports, with
// labels their families carry, follows the instance and pool selection,
// and is PromQL that Prometheus accepts.
func TestDashboardQueriesUseExportedSeriesAndTheirLabels(t *testing.T) {
	d, _ := readDashboard(t)
	series := dashSeries(t)
	qs := dashQueries(t, d)
	require.NotEmpty(t, qs)
	for _, q := range qs {
		for _, f := range dashCheck(q, series) {
			assert.Fail(t, f, "expr: %s", q.expr)
		}
	}
	out, err := dashPromtool(t, qs)
	var names []string
	for _, q := range qs {
		names = append(names, q.record+" = "+q.where)
	}
	assert.NoError(t, err, "promtool check rules:\n%s\nrules:\n%s", out, strings.Join(names, "\n"))
	assert.Contains(t, out, fmt.Sprintf("SUCCESS: %d rules found", len(qs)))
}

// The checks catch each kind of broken query, so that a passing dashboard
// means something.
func TestDashboardChecksRejectBrokenQueries(t *testing.T) {
	series := dashSeries(t)
	sel := `instance=~"$instance", pool_id=~"$pool_id"`
	for _, tc := range []struct {
		name, expr, legend, finding string
	}{
		{"a misspelt metric", `pool_managerd_pool_readyy{` + sel + `}`, "", "pool_managerd_pool_readyy is not a series the daemon exports"},
		{"a metric without its prefix", `active_leases{` + sel + `}`, "", "active_leases is not a series the daemon exports"},
		{"a histogram without _bucket", `pool_managerd_drain_duration_seconds{` + sel + `}`, "", "pool_managerd_drain_duration_seconds is not a series"},
		{"a matcher on a label the family lacks", `pool_managerd_engine_crashes_total{` + sel + `, crash_reason="oom"}`, "", "has no label crash_reason (matcher)"},
		{"a grouping label the family lacks", `sum by (reason) (rate(pool_managerd_restarts_scheduled_total{` + sel + `}[$__rate_interval]))`, "", "by (reason): not every one of pool_managerd_restarts_scheduled_total has label reason"},
		{"a trailing grouping label the family lacks", `sum(rate(pool_managerd_restarts_scheduled_total{` + sel + `}[5m])) by (outcome)`, "", "has label outcome"},
		{"le on a histogram's _count", `sum by (le) (rate(pool_managerd_reload_duration_seconds_count{` + sel + `}[5m]))`, "", "has label le"},
		{"a legend label the family lacks", `pool_managerd_circuit_breaker_state{` + sel + `}`, "{{pool_id}} {{kind}}", "legend {{kind}}"},
		{"a legend label the aggregation drops", `sum by (reason) (increase(pool_managerd_engine_crashes_total{` + sel + `}[5m]))`, "{{pool_id}}", "the result keeps only reason"},
		{"a query that ignores the pool selection", `pool_managerd_active_leases{instance=~"$instance"}`, "", "does not follow the pool_id variable"},
		{"a query that ignores the instance selection", `pool_managerd_active_leases{pool_id=~"$pool_id"}`, "", "does not follow the instance variable"},
		{"an unknown variable", `pool_managerd_active_leases{` + sel + `, job="$job"}`, "", "unknown variable $job"},
		{"a selector without a name", `{` + sel + `}`, "", "a selector without a metric name"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			findings := dashCheck(dashQuery{where: "q", expr: tc.expr, legend: tc.legend, panel: true}, series)
			assert.Contains(t, strings.Join(findings, "\n"), tc.finding)
		})
	}
	for _, tc := range []struct{ name, expr, says string }{
		{"an unknown function", `sum by (pool_id) (rte(pool_managerd_drains_total{` + sel + `}[$__rate_interval]))`, "unknown function"},
		{"a range where an instant vector belongs", `sum by (pool_id) (pool_managerd_drains_total{` + sel + `}[$__rate_interval])`, "range vector"},
	} {
		t.Run("promtool refuses "+tc.name, func(t *testing.T) {
			q := dashQuery{where: "q", record: "dashboard:broken", expr: tc.expr, panel: true}
			assert.Empty(t, dashCheck(q, series), "only PromQL's own parser sees this")
			out, err := dashPromtool(t, []dashQuery{q})
			assert.Error(t, err)
			assert.Contains(t, out, "dashboard:broken")
			assert.Contains(t, out, tc.says)
		})
	}
}

// A dashboard that Grafana imports into any installation: strict JSON, a
// fixed uid, a current schema, the Prometheus data source chosen by a
// variable and never by a uid of ours, and the panels the operator needs.
func TestDashboardIsWellFormedAndCoversThePools(t *testing.T) {
	d, b := readDashboard(t)
	assert.NotEmpty(t, d.UID)
	assert.NotEmpty(t, d.Title)
	assert.GreaterOrEqual(t, d.SchemaVersion, 39)

	vars := map[string]dashVariable{}
	for _, v := range d.Templating.List {
		vars[v.Name] = v
	}
	if assert.Contains(t, vars, "datasource") {
		assert.Equal(t, "datasource", vars["datasource"].Type)
		assert.JSONEq(t, `"prometheus"`, string(vars["datasource"].Query))
	}
	for _, name := range []string{"instance", "pool_id"} {
		if assert.Contains(t, vars, name) {
			assert.Equal(t, "query", vars[name].Type, name)
			assert.Regexp(t, `^label_values\(`, dashVariableQuery(t, vars[name]), name)
		}
	}

	// Every data source reference, wherever it is, is the variable.
	var doc any
	require.NoError(t, json.Unmarshal(b, &doc))
	var refs int
	var walk func(any, string)
	walk = func(v any, path string) {
		switch v := v.(type) {
		case map[string]any:
			for k, c := range v {
				if k == "datasource" {
					refs++
					ds, ok := c.(map[string]any)
					if assert.True(t, ok, "%s.datasource: an object", path) {
						assert.Equal(t, "prometheus", ds["type"], "%s.datasource", path)
						assert.Equal(t, "${datasource}", ds["uid"], "%s.datasource: no fixed uid", path)
					}
				}
				walk(c, path+"."+k)
			}
		case []any:
			for i, c := range v {
				walk(c, fmt.Sprintf("%s[%d]", path, i))
			}
		}
	}
	walk(doc, "$")
	assert.Positive(t, refs)

	ids := map[int]string{}
	used := map[string]bool{}
	family := regexp.MustCompile(`pool_managerd_[a-z_]+`)
	idle := false
	var panels func([]dashPanel, bool)
	panels = func(ps []dashPanel, nested bool) {
		for _, p := range ps {
			assert.NotEmpty(t, p.Title, "panel %d", p.ID)
			if other, dup := ids[p.ID]; dup {
				assert.Fail(t, "panel id given twice", "%d: %q and %q", p.ID, other, p.Title)
			}
			ids[p.ID] = p.Title
			assert.True(t, p.GridPos.W > 0 && p.GridPos.H > 0 && p.GridPos.X+p.GridPos.W <= 24, "panel %q: gridPos", p.Title)
			if p.Type == "row" {
				assert.False(t, nested, "row %q inside a row", p.Title)
				assert.Empty(t, p.Targets, "row %q", p.Title)
				panels(p.Panels, true)
				continue
			}
			assert.NotEmpty(t, p.Targets, "panel %q: no query", p.Title)
			var state bool
			for _, tg := range p.Targets {
				assert.NotEmpty(t, tg.RefID, "panel %q", p.Title)
				for _, n := range family.FindAllString(tg.Expr, -1) {
					n = strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(n, "_bucket"), "_sum"), "_count")
					used[n] = true
					state = state || n == "pool_managerd_circuit_breaker_state"
				}
				idle = idle || strings.Contains(tg.Expr, `pool_managerd_pool_state{`) && strings.Contains(tg.Expr, `state="idle"`)
			}
			if state {
				got := map[string]string{}
				for _, m := range p.FieldConfig.Defaults.Mappings {
					for v, o := range m.Options {
						got[v] = o.Text
					}
				}
				assert.Equal(t, map[string]string{"0": "closed", "1": "open", "2": "half-open"}, got, "panel %q: breaker states by name", p.Title)
			}
		}
	}
	panels(d.Panels, false)
	for _, f := range []string{
		"pool_managerd_pool_ready", "pool_managerd_active_leases",
		"pool_managerd_engine_crashes_total", "pool_managerd_restarts_scheduled_total",
		"pool_managerd_backoff_delay_seconds", "pool_managerd_restart_rate",
		"pool_managerd_circuit_breaker_state",
		"pool_managerd_drains_total", "pool_managerd_drain_duration_seconds",
		"pool_managerd_reload_duration_seconds", "pool_managerd_reload_success_total", "pool_managerd_reload_failure_total",
		"pool_managerd_gpu_unhealthy",
		"pool_managerd_idle_stops_total", "pool_managerd_lease_starts_total",
		"pool_managerd_wakes_total", "pool_managerd_wake_duration_seconds",
		"pool_managerd_group_swaps_total", "pool_managerd_group_swap_duration_seconds",
	} {
		assert.True(t, used[f], "no panel shows %s", f)
	}
	assert.True(t, idle, "no panel shows the pools idle (pool_managerd_pool_state{state=\"idle\"})")
}

// Grafana would half-read these; the test reads none of them.
func TestDashboardParserRefusesMalformedFiles(t *testing.T) {
	for _, tc := range []struct{ name, text, err string }{
		{"cut short", `{"uid": "x", "panels": [`, "EOF"},
		{"a key given twice", `{"uid": "x", "panels": [{"id": 1, "title": "a", "id": 2}]}`, `$.panels[0]: key "id" given twice`},
		{"data after the object", `{"uid": "x"} {"uid": "y"}`, "data after the dashboard object"},
		{"a field of the wrong type", `{"uid": "x", "schemaVersion": "39"}`, "schemaVersion"},
		{"a trailing comma", `{"uid": "x",}`, "invalid character"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseDashboard([]byte(tc.text))
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.err)
		})
	}
}
