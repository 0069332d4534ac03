package lifecycle

import (
	"errors"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/crash"
)

// A broken engine's /health may keep answering: good health probes
// between failed canaries do not reset them, and FailureThreshold failed
// canaries stop the engine as unhealthy, its LastError naming the canary.
func TestCanaryFailuresAreNotResetByGoodProbes(t *testing.T) {
	p := newPool(t, nil)
	run := p.ready()
	broken := errors.New("POST /v1/completions answered 500")
	for i := 1; i <= 3; i++ {
		p.advance(time.Second)
		p.step(Probed{Run: run})
		_, stopping := find[StopScope](p.last)
		require.False(t, stopping, "a good probe stops nothing")
		p.step(Probed{Run: run, Err: broken, Canary: true})
		_, stopping = find[StopScope](p.last)
		assert.Equal(t, i == 3, stopping, "canary %d", i)
		_, counted := find[CountHealthFailure](p.last)
		assert.True(t, counted, "a failed canary is a failed health probe")
		assert.Len(t, p.m.View(p.now).HealthFailures, i)
	}
	// Canaries of a stopping engine are not counted again.
	p.step(Probed{Run: run, Err: broken, Canary: true})
	assert.Len(t, p.m.View(p.now).HealthFailures, 3)
	p.exit(run, killedBy(syscall.SIGTERM))
	v := p.m.View(p.now)
	assert.Equal(t, crash.HealthCheck, v.LastReason)
	assert.Equal(t, Backoff, v.State)
	assert.Contains(t, v.LastError, "health check failed 3 times (canary request failed: POST /v1/completions answered 500)")
}

// A good canary resets the canaries' count, not the probes'; a good probe
// resets the probes', not the canaries'.
func TestCanaryAndProbeFailuresCountApart(t *testing.T) {
	p := newPool(t, nil)
	run := p.ready()
	bad := errors.New("bad")
	step := func(canary bool, err error) bool {
		p.advance(time.Second)
		p.step(Probed{Run: run, Err: err, Canary: canary})
		_, stopping := find[StopScope](p.last)
		return stopping
	}
	require.False(t, step(true, bad))
	require.False(t, step(true, bad))
	require.False(t, step(true, nil), "a good canary")
	assert.Empty(t, p.m.View(p.now).HealthFailures, "a good canary resets them")
	require.False(t, step(false, bad))
	require.False(t, step(false, bad))
	require.False(t, step(true, bad), "two failed probes and one failed canary are no run of three")
	assert.Len(t, p.m.View(p.now).HealthFailures, 3, "both kinds are shown")
	require.False(t, step(true, nil), "a good canary leaves the probes' failures")
	assert.Len(t, p.m.View(p.now).HealthFailures, 2)
	require.True(t, step(false, bad), "the third probe in a row")
	p.exit(run, killedBy(syscall.SIGTERM))
	v := p.m.View(p.now)
	assert.Equal(t, crash.HealthCheck, v.LastReason)
	assert.Contains(t, v.LastError, "health check failed 3 times (bad)")
}

// The warm-up is the test of an engine not yet serving: a canary then is
// not counted.
func TestCanaryCountsOnlyOnceServing(t *testing.T) {
	p := newPool(t, func(c *Config) { c.Warmup = true })
	req := p.request(func(id ReqID) Event { return StartRequested{Req: id} })
	run := p.launchStaged(staged("m.gguf", "sha256:a"), 100)
	require.NoError(t, p.reply(req).Err)
	p.step(Healthy{Run: run})
	require.Equal(t, Warming, p.m.State())
	for range 3 {
		p.step(Probed{Run: run, Err: errors.New("bad"), Canary: true})
		_, stopping := find[StopScope](p.last)
		require.False(t, stopping)
	}
	assert.Empty(t, p.m.View(p.now).HealthFailures)
	p.step(WarmedUp{Run: run})
	assert.Equal(t, Ready, p.m.State())
}
