package check

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

// Healthy probes of every pool land on one grid per interval: pools probed
// every 5 s wake the daemon together, whenever each engine became healthy.
func TestProbesAreAligned(t *testing.T) {
	every := 5 * time.Second
	for _, off := range []time.Duration{0, time.Nanosecond, 1234 * time.Millisecond, every - time.Nanosecond, every, 7*every + 3*time.Millisecond} {
		now := probeEpoch.Add(off)
		d := untilProbe(now, every)
		assert.Greater(t, d, time.Duration(0), "offset %v", off)
		assert.LessOrEqual(t, d, every, "offset %v", off)
		assert.Zero(t, now.Add(d).Sub(probeEpoch)%every, "offset %v: next probe on the grid", off)
	}
	a, b := probeEpoch.Add(3*every+time.Second), probeEpoch.Add(3*every+4*time.Second)
	assert.Equal(t, a.Add(untilProbe(a, every)), b.Add(untilProbe(b, every)), "two pools, one wake-up")
}
