package load

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The host's CPU readings: busy and steal shares over the run, from two
// /proc/stat readings.
func TestHostDuringTheRun(t *testing.T) {
	a := CPUTimes{total: 1000, idle: 600, steal: 10}
	b := CPUTimes{total: 2000, idle: 900, steal: 60}
	h := During(2, a, b)
	assert.Equal(t, 2, h.Load)
	assert.InDelta(t, 70, h.BusyPct, 1e-9)
	assert.InDelta(t, 5, h.StealPct, 1e-9)
	assert.Positive(t, h.CPUs)
	now, err := ReadCPUTimes()
	require.NoError(t, err)
	assert.Greater(t, now.total, now.idle)
}

// The line a run prints says which load it ran under.
func TestDescribeSaysTheLoad(t *testing.T) {
	h := Host{Load: 2, CPUs: 2, BusyPct: 99.6, StealPct: 0.1, LoadAvg: [3]float64{4, 3, 2}}
	assert.Equal(t, "load=2: 2 CPU-bound processes in the engines' slice, for the whole soak; host during the run: 2 CPUs, 100 % busy, 0.1 % steal, load average 4.00 3.00 2.00 at the end",
		h.Describe("for the whole soak"))
	h.Load = 0
	assert.Contains(t, h.Describe("every round"), "quiet (no added load); host during the run: 2 CPUs")
}

// load=N takes 0 to Max processes; anything else is refused.
func TestParse(t *testing.T) {
	for v, want := range map[string]int{"0": 0, "2": 2, "64": 64} {
		n, err := Parse(v)
		require.NoError(t, err, v)
		assert.Equal(t, want, n)
	}
	for _, bad := range []string{"-1", "65", "x", "", "2.5"} {
		_, err := Parse(bad)
		assert.ErrorContains(t, err, "load: want 0 to 64 processes", bad)
	}
}
