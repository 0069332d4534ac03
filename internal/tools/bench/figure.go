package main

import (
	"fmt"
	"math"
	"slices"
	"time"
)

// Round is one round of a figure: ours measured, then the reference, on
// the same machine a moment apart.
type Round struct {
	// Index counts rounds from 1.
	Index int `json:"index"`
	// Samples (in the figure's unit) of ours and of the reference, as
	// measured.
	Samples    []float64 `json:"samples"`
	RefSamples []float64 `json:"reference_samples,omitempty"`
	Median     float64   `json:"median"`
	P99        float64   `json:"p99"`
	RefMedian  float64   `json:"reference_median,omitempty"`
	RefP99     float64   `json:"reference_p99,omitempty"`
	// Value and Ref are ours and the reference by the figure's basis;
	// Ratio is Value / Ref (0 without a reference).
	Value float64 `json:"value"`
	Ref   float64 `json:"reference,omitempty"`
	Ratio float64 `json:"ratio,omitempty"`
	// Overhead is what ours adds to the reference (overhead goals), and
	// Allowance what the goal grants on top of its limit in this round
	// (the reload's hashing time).
	Overhead  float64 `json:"overhead,omitempty"`
	Allowance float64 `json:"allowance,omitempty"`
	// Parts break ours down (medians, in the figure's unit).
	Parts map[string]float64 `json:"parts,omitempty"`
}

// Goal says what a figure must meet, judged on the median of its rounds.
type Goal struct {
	Text string `json:"text"`
	// Of is what is judged: "ratio", "value" or "overhead" (less the
	// round's allowance); "" for a figure only reported.
	Of string `json:"of,omitempty"`
	// AtMost / AtLeast bound the median of rounds; WorstBelow, when
	// set, bounds the worst round too (strictly).
	AtMost     float64 `json:"at_most,omitempty"`
	AtLeast    float64 `json:"at_least,omitempty"`
	WorstBelow float64 `json:"worst_below,omitempty"`
}

func (g Goal) higherIsBetter() bool { return g.AtLeast != 0 }

// judged is the quantity of a round the goal looks at.
func (g Goal) judged(r Round) float64 {
	switch g.Of {
	case "ratio":
		return r.Ratio
	case "overhead":
		return r.Overhead - r.Allowance
	}
	return r.Value
}

// Figure is one figure over its rounds.
type Figure struct {
	Name      string  `json:"name"`
	Unit      string  `json:"unit"`
	Basis     string  `json:"basis"` // median, p99, value, throughput
	Reference string  `json:"reference,omitempty"`
	Goal      Goal    `json:"goal"`
	Rounds    []Round `json:"rounds"`
	// Medians over rounds of ours, the reference and the judged quantity.
	Ours        float64 `json:"ours"`
	RefValue    float64 `json:"reference_value,omitempty"`
	Judged      float64 `json:"judged"`
	RatioMin    float64 `json:"ratio_min,omitempty"`
	RatioMedian float64 `json:"ratio_median,omitempty"`
	RatioMax    float64 `json:"ratio_max,omitempty"`
	// Worst is the round farthest from the goal (by the judged quantity).
	WorstRound  int     `json:"worst_round"`
	WorstJudged float64 `json:"worst_judged"`
	Met         bool    `json:"met"`
	// Parts are the medians over rounds of the rounds' parts.
	Parts map[string]float64 `json:"parts,omitempty"`
}

func ms(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e6 }

func msAll(ds []time.Duration) []float64 {
	out := make([]float64, len(ds))
	for i, d := range ds {
		out[i] = math.Round(ms(d)*1000) / 1000
	}
	return out
}

// quantile by nearest rank (p99 of fewer than 100 samples is the largest).
func quantile(xs []float64, q float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	i := int(math.Ceil(q*float64(len(s)))) - 1
	return s[max(0, min(len(s)-1, i))]
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if n := len(s); n%2 == 0 {
		return (s[n/2-1] + s[n/2]) / 2
	}
	return s[len(s)/2]
}

// newRound fills round i (counted from 0) from its samples, by basis.
func newRound(i int, basis string, ours, ref []float64) Round {
	r := Round{Index: i + 1, Samples: ours, RefSamples: ref, Median: median(ours), P99: quantile(ours, 0.99)}
	if len(ref) > 0 {
		r.RefMedian, r.RefP99 = median(ref), quantile(ref, 0.99)
	}
	switch basis {
	case "p99":
		r.Value, r.Ref = r.P99, r.RefP99
	default:
		r.Value, r.Ref = r.Median, r.RefMedian
	}
	if r.Ref > 0 {
		r.Ratio = r.Value / r.Ref
	}
	return r
}

// summarize computes a figure's medians over rounds, its worst round and
// whether it met its goal.
func (f *Figure) summarize() {
	if len(f.Rounds) == 0 {
		return
	}
	var ours, refs, ratios, judged []float64
	parts := map[string][]float64{}
	for _, r := range f.Rounds {
		ours = append(ours, r.Value)
		if r.Ref != 0 {
			refs = append(refs, r.Ref)
		}
		if r.Ratio != 0 {
			ratios = append(ratios, r.Ratio)
		}
		judged = append(judged, f.Goal.judged(r))
		for k, v := range r.Parts {
			parts[k] = append(parts[k], v)
		}
	}
	f.Ours = median(ours)
	if len(refs) > 0 {
		f.RefValue = median(refs)
	}
	if len(ratios) > 0 {
		f.RatioMin, f.RatioMedian, f.RatioMax = slices.Min(ratios), median(ratios), slices.Max(ratios)
	}
	if len(parts) > 0 {
		f.Parts = map[string]float64{}
		for k, v := range parts {
			f.Parts[k] = median(v)
		}
	}
	f.Judged = median(judged)
	f.WorstRound, f.WorstJudged = f.Rounds[0].Index, judged[0]
	for i, j := range judged {
		worse := j > f.WorstJudged
		if f.Goal.higherIsBetter() {
			worse = j < f.WorstJudged
		}
		if worse {
			f.WorstRound, f.WorstJudged = f.Rounds[i].Index, j
		}
	}
	g := f.Goal
	switch {
	case g.Of == "":
		f.Met = true
	case g.AtLeast != 0:
		f.Met = f.Judged >= g.AtLeast
	default:
		f.Met = f.Judged <= g.AtMost
	}
	if g.WorstBelow != 0 && f.WorstJudged >= g.WorstBelow {
		f.Met = false
	}
}

// Figures collects rounds by figure, in the order figures were first seen.
type Figures struct {
	order []string
	byKey map[string]*Figure
}

func (fs *Figures) add(proto Figure, r Round) {
	if fs.byKey == nil {
		fs.byKey = map[string]*Figure{}
	}
	f := fs.byKey[proto.Name]
	if f == nil {
		p := proto
		p.Rounds = nil
		f = &p
		fs.byKey[proto.Name] = f
		fs.order = append(fs.order, proto.Name)
	}
	f.Rounds = append(f.Rounds, r)
}

func (fs *Figures) list() []Figure {
	var out []Figure
	for _, k := range fs.order {
		f := *fs.byKey[k]
		f.summarize()
		out = append(out, f)
	}
	return out
}

func fmtNum(x float64) string {
	switch a := math.Abs(x); {
	case math.IsNaN(x):
		return "-"
	case a >= 100:
		return fmt.Sprintf("%.0f", x)
	case a >= 10:
		return fmt.Sprintf("%.1f", x)
	case a >= 1:
		return fmt.Sprintf("%.2f", x)
	}
	return fmt.Sprintf("%.3f", x)
}
