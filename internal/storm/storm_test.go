package storm

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"

	"github.com/llorch/pool-managerd/internal/crash"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func sec(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }

func TestWindowSlides(t *testing.T) {
	w := NewWindow(Params{Max: 3, Window: 10 * time.Second})
	for _, s := range []float64{0, 4, 8} {
		w.Add(sec(s), crash.ExitCode)
	}
	assert.Equal(t, 3, w.Count(sec(8)))
	assert.Equal(t, 3, w.Count(sec(9.999)))
	assert.Equal(t, 2, w.Count(sec(10)), "a restart leaves the window exactly Window later")
	assert.Equal(t, sec(10), w.AllowedAt(sec(8)))
	assert.Equal(t, sec(11), w.AllowedAt(sec(11)))
	w.Add(sec(10), crash.ExitCode)
	assert.Equal(t, sec(14), w.AllowedAt(sec(10)))
	assert.Equal(t, 0, w.Count(sec(30)))
}

func TestClassify(t *testing.T) {
	cases := []struct {
		reasons []crash.Reason
		kind    Kind
		class   crash.Class
	}{
		{[]crash.Reason{crash.OutOfMemory, crash.OutOfMemory, crash.ExitCode}, OOMStorm, crash.ClassOOM},
		{[]crash.Reason{crash.CUDAError, crash.DriverXID, crash.Signal}, CUDAStorm, crash.ClassCUDA},
		{[]crash.Reason{crash.ExitCode, crash.Signal, crash.CoreDump, crash.HealthCheck}, ProcessStorm, crash.ClassProcess},
		{[]crash.Reason{crash.HealthCheck, crash.ExitCode}, MixedStorm, crash.ClassGeneral},
		{[]crash.Reason{crash.StartFailure}, StartStorm, crash.ClassStart},
	}
	for _, c := range cases {
		k, cl := Classify(c.reasons)
		assert.Equal(t, c.kind, k, "%v", c.reasons)
		assert.Equal(t, c.class, cl, "%v", c.reasons)
		assert.NotEmpty(t, k.Hint())
	}
}

func TestWarnAt(t *testing.T) {
	assert.Equal(t, 5, Defaults().WarnAt())
	assert.Equal(t, 0, Params{Max: 1}.WarnAt())
}

// The count falls when the oldest restart leaves the window: NextExit says
// when, and after Prune at that moment the next one.
func TestNextExitIsWhenTheOldestRestartLeaves(t *testing.T) {
	w := NewWindow(Params{Max: 3, Window: 10 * time.Second})
	assert.True(t, w.NextExit().IsZero(), "nothing to leave")
	w.Add(sec(0), crash.ExitCode)
	w.Add(sec(4), crash.ExitCode)
	assert.Equal(t, sec(10), w.NextExit())
	w.Prune(sec(10))
	assert.Equal(t, 1, w.Count(sec(10)))
	assert.Equal(t, sec(14), w.NextExit())
	w.Prune(sec(14))
	assert.True(t, w.NextExit().IsZero())
}

func TestKindOfEveryClass(t *testing.T) {
	for c, k := range map[crash.Class]Kind{
		crash.ClassProcess: ProcessStorm, crash.ClassOOM: OOMStorm, crash.ClassHealth: HealthStorm,
		crash.ClassCUDA: CUDAStorm, crash.ClassStart: StartStorm, crash.ClassGeneral: MixedStorm,
	} {
		assert.Equal(t, k, KindOf(c), c)
	}
	for _, c := range crash.Classes {
		assert.NotEqual(t, MixedStorm, KindOf(c), "every class has its own kind: %s", c)
	}
}
