package main

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func rounds(basis string, pairs ...[2]float64) []Round {
	var out []Round
	for i, p := range pairs {
		out = append(out, newRound(i, basis, []float64{p[0]}, []float64{p[1]}))
	}
	return out
}

// A goal is met on the median of rounds, a worst-round bound on the worst
// one, and the worst round is named by its number and judged value.
func TestGoalIsJudgedOnTheMedianOfRoundsAndTheWorstIsNamed(t *testing.T) {
	cases := []struct {
		name      string
		goal      Goal
		pairs     [][2]float64
		met       bool
		judged    float64
		worst     int
		worstSeen float64
	}{
		{"one bad round does not miss a median goal", Goal{Of: "ratio", AtMost: 1.0},
			[][2]float64{{9, 10}, {25, 10}, {10, 10}}, true, 1.0, 2, 2.5},
		{"a median over the goal misses it", Goal{Of: "ratio", AtMost: 1.0},
			[][2]float64{{11, 10}, {12, 10}, {9, 10}}, false, 1.1, 2, 1.2},
		{"the worst round bounds the figure too", Goal{Of: "ratio", AtMost: 1.0, WorstBelow: 1.3},
			[][2]float64{{9, 10}, {13, 10}, {10, 10}}, false, 1.0, 2, 1.3},
		{"the worst round under its bound passes", Goal{Of: "ratio", AtMost: 1.0, WorstBelow: 1.3},
			[][2]float64{{9, 10}, {12.9, 10}, {10, 10}}, true, 1.0, 2, 1.29},
		{"higher is better: the slowest round is the worst", Goal{Of: "ratio", AtLeast: 1.0},
			[][2]float64{{30, 10}, {8, 10}, {20, 10}}, true, 2.0, 2, 0.8},
		{"a value goal looks at ours alone", Goal{Of: "value", AtMost: 5},
			[][2]float64{{3, 100}, {4, 100}, {15, 100}}, true, 4, 3, 15},
		{"a report has no goal to miss", Goal{Text: "report"},
			[][2]float64{{3, 1}, {4, 1}}, true, 3.5, 2, 4},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := Figure{Basis: "median", Goal: c.goal, Rounds: rounds("median", c.pairs...)}
			f.summarize()
			assert.Equal(t, c.met, f.Met)
			assert.InDelta(t, c.judged, f.Judged, 1e-9)
			assert.Equal(t, c.worst, f.WorstRound, "rounds count from 1")
			assert.InDelta(t, c.worstSeen, f.WorstJudged, 1e-9)
		})
	}
}

// The ratio's spread over rounds is reported whatever the goal judges.
func TestRatioSpreadOverRounds(t *testing.T) {
	f := Figure{Basis: "median", Goal: Goal{Of: "ratio", AtMost: 1}, Rounds: rounds("median", [2]float64{20, 10}, [2]float64{5, 10}, [2]float64{10, 10})}
	f.summarize()
	assert.Equal(t, 0.5, f.RatioMin)
	assert.Equal(t, 1.0, f.RatioMedian)
	assert.Equal(t, 2.0, f.RatioMax)
	assert.Equal(t, 10.0, f.Ours)
	assert.Equal(t, 10.0, f.RefValue)
}

// An overhead goal grants each round its allowance (the reload's hashing
// time) on top of the limit.
func TestOverheadGoalAllowsTheRoundsHashing(t *testing.T) {
	mk := func(over, allow float64) Round { return Round{Overhead: over, Allowance: allow} }
	f := Figure{Goal: Goal{Of: "overhead", AtMost: 50}, Rounds: []Round{mk(70, 30), mk(60, 20), mk(55, 0)}}
	f.summarize()
	assert.True(t, f.Met, "40, 40 and 55 ms over the allowance: median 40")
	assert.InDelta(t, 40, f.Judged, 1e-9)
	assert.Equal(t, 55.0, f.WorstJudged)
}

// An overhead round is judged on its median less the reference's median
// (not on the median of differences), with no ratio to report; a
// reference of two parts adds them sample by sample.
func TestOverheadRoundOfTwoPartReference(t *testing.T) {
	ms := func(xs ...int) []time.Duration {
		var out []time.Duration
		for _, x := range xs {
			out = append(out, time.Duration(x)*time.Millisecond)
		}
		return out
	}
	ref := sumEach(ms(2, 3, 50), ms(5, 4, 1))
	assert.Equal(t, ms(7, 7, 51), ref)
	r := overheadRound(2, ms(30, 10, 20), ref)
	assert.Equal(t, 3, r.Index)
	assert.Equal(t, 20.0, r.Median)
	assert.Equal(t, 7.0, r.RefMedian)
	assert.InDelta(t, 13, r.Overhead, 1e-9)
	assert.Zero(t, r.Ratio)
	f := Figure{Basis: "median", Goal: swapFig.Goal, Rounds: []Round{r}}
	f.summarize()
	assert.True(t, f.Met)
	assert.InDelta(t, 13, f.Judged, 1e-9)
	assert.Panics(t, func() { sumEach(ms(1, 2), ms(1)) }, "parts of unequal counts")
}

// p99 of fewer than a hundred samples is the largest, by nearest rank;
// a round's value follows the figure's basis.
func TestRoundBasis(t *testing.T) {
	xs := []float64{5, 1, 4, 2, 3}
	assert.Equal(t, 5.0, quantile(xs, 0.99))
	assert.Equal(t, 3.0, median(xs))
	assert.Equal(t, 2.5, median([]float64{1, 2, 3, 4}))
	assert.Equal(t, 0.0, median(nil), "no samples: no NaN in the JSON")
	r := newRound(0, "p99", xs, []float64{1, 2})
	assert.Equal(t, 5.0, r.Value)
	assert.Equal(t, 2.0, r.Ref)
	assert.Equal(t, 2.5, r.Ratio)
	assert.Equal(t, 1, r.Index)
	r = newRound(1, "median", xs, nil)
	assert.Equal(t, 3.0, r.Value)
	assert.Zero(t, r.Ratio, "no reference, no ratio")
}

func TestFiguresKeepTheirRoundsInOrder(t *testing.T) {
	var fs Figures
	a, b := Figure{Name: "a", Goal: Goal{Of: "value", AtMost: 1}}, Figure{Name: "b"}
	for r := range 3 {
		fs.add(a, newRound(r, "median", []float64{float64(r)}, nil))
		fs.add(b, newRound(r, "median", []float64{1}, nil))
	}
	list := fs.list()
	require.Len(t, list, 2)
	assert.Equal(t, "a", list[0].Name)
	require.Len(t, list[0].Rounds, 3)
	assert.Equal(t, []int{1, 2, 3}, []int{list[0].Rounds[0].Index, list[0].Rounds[1].Index, list[0].Rounds[2].Index})
	assert.Equal(t, 3, list[0].WorstRound)
}

func TestArguments(t *testing.T) {
	o, err := parseArgs(nil)
	require.NoError(t, err)
	assert.Equal(t, figureNames, o.Figures)
	assert.True(t, o.all)
	assert.Equal(t, 5, o.Rounds)

	o, err = parseArgs([]string{"restart", "crash", "rounds=3", "stage-mb=64"})
	require.NoError(t, err)
	assert.Equal(t, []string{"crash", "restart"}, o.Figures, "in run order")
	assert.False(t, o.all)
	assert.Equal(t, 3, o.Rounds)
	assert.Equal(t, 64, o.StageMB)

	o, err = parseArgs([]string{"scale"})
	require.NoError(t, err)
	assert.Equal(t, []string{"scale", "storm"}, o.Figures, "scale names every 64-pool figure")
	o, err = parseArgs([]string{"ondemand", "rounds=3"})
	require.NoError(t, err)
	assert.Equal(t, []string{"ondemand"}, o.Figures, "the cold start, the group swap, the wake and the 64 pools with 60 idle")

	o, err = parseArgs([]string{"load=2", "crash"})
	require.NoError(t, err)
	assert.Equal(t, 2, o.Load)
	o, err = parseArgs([]string{"load=0"})
	require.NoError(t, err)
	assert.Equal(t, 0, o.Load, "load=0 is the quiet run")
	o, err = parseArgs([]string{"crash", "profile=/tmp/prof/"})
	require.NoError(t, err)
	assert.Equal(t, "/tmp/prof", o.Profile)
	_, err = parseArgs([]string{"profile=prof"})
	assert.ErrorContains(t, err, `profile: want an absolute directory, got "prof"`)

	for _, bad := range [][]string{{"crsh"}, {"rounds=0"}, {"rounds=x"}, {"speed=3"}, {"load=-1"}, {"load=65"}} {
		_, err := parseArgs(bad)
		assert.Error(t, err, "%v", bad)
	}
	_, err = parseArgs([]string{"crsh"})
	assert.ErrorContains(t, err, `unknown figure "crsh"`)
	assert.ErrorContains(t, err, "figures: crash restart")
}
