package capture

import (
	"fmt"
	"regexp"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

var seriesRe = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?$`)

// Series finds one series by its exposition-format name, e.g.
// pool_managerd_restart_rate{pool_id="a"}: the labels given must be all the
// series has.
func Series(g prometheus.Gatherer, s string) (*dto.Metric, dto.MetricType, error) {
	m := seriesRe.FindStringSubmatch(s)
	if m == nil {
		return nil, 0, fmt.Errorf("cannot read series %q", s)
	}
	want := map[string]string{}
	if m[2] != "" {
		for _, kv := range strings.Split(m[2], ",") {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				return nil, 0, fmt.Errorf("cannot read label %q in %q", kv, s)
			}
			want[k] = strings.Trim(v, `"`)
		}
	}
	fams, err := g.Gather()
	if err != nil {
		return nil, 0, err
	}
	for _, f := range fams {
		if f.GetName() != m[1] {
			continue
		}
		for _, mt := range f.GetMetric() {
			if labelsEqual(mt.GetLabel(), want) {
				return mt, f.GetType(), nil
			}
		}
		return nil, 0, fmt.Errorf("family %s has no series with labels %v", m[1], want)
	}
	return nil, 0, fmt.Errorf("no metric family %s", m[1])
}

func labelsEqual(have []*dto.LabelPair, want map[string]string) bool {
	if len(have) != len(want) {
		return false
	}
	for _, l := range have {
		if v, ok := want[l.GetName()]; !ok || v != l.GetValue() {
			return false
		}
	}
	return true
}

// Value is a counter or gauge value.
func Value(m *dto.Metric, t dto.MetricType) (float64, error) {
	switch t {
	case dto.MetricType_COUNTER:
		return m.GetCounter().GetValue(), nil
	case dto.MetricType_GAUGE:
		return m.GetGauge().GetValue(), nil
	}
	return 0, fmt.Errorf("metric of type %s has no single value", t)
}
