package canary_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/check"
	"github.com/llorch/pool-managerd/internal/check/canary"
	"github.com/llorch/pool-managerd/internal/check/probe"
	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/lifecycle"
)

// On a run, the canary follows good health probes: once it failed it is
// sent after each of them, and never after a failed one.
func TestCanaryFollowsGoodProbes(t *testing.T) {
	var healthBad atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/health":
			if healthBad.Load() {
				w.WriteHeader(http.StatusServiceUnavailable)
			}
		case "/v1/completions":
			// Generation is broken; /health is not.
			w.WriteHeader(http.StatusInternalServerError)
		}
	}))
	defer srv.Close()
	h := config.Health{Interval: 20 * time.Millisecond, Timeout: 100 * time.Millisecond, StartTimeout: 5 * time.Second,
		Canary: &config.WarmupRequest{Method: "POST", Path: "/v1/completions", Body: `{"prompt":"Hi"}`}, CanaryIdle: 50 * time.Millisecond}
	var mu sync.Mutex
	var evs []lifecycle.Event
	tell := func(ev lifecycle.Event) { mu.Lock(); evs = append(evs, ev); mu.Unlock() }
	told := func() []lifecycle.Event { mu.Lock(); defer mu.Unlock(); return append([]lifecycle.Event(nil), evs...) }
	canaries := func() int {
		n := 0
		for _, ev := range told() {
			if p, ok := ev.(lifecycle.Probed); ok && p.Canary {
				n++
			}
		}
		return n
	}
	// A good probe after a good probe is a beat, not told: logged here as
	// the good probe it is.
	tgt := check.Target{Run: 3, Owned: func(_, _ netip.AddrPort) error { return nil },
		Beat: func(time.Time) { tell(lifecycle.Probed{Run: 3}) }}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	check.Start(ctx, []check.Kind{probe.Kind, canary.Kind}, check.Config{HealthURL: srv.URL + "/health", Health: h}, tgt, time.Time{}, tell)
	require.Eventually(t, func() bool { return canaries() >= 3 }, 5*time.Second, time.Millisecond)
	healthBad.Store(true)
	time.Sleep(50 * time.Millisecond)
	before := canaries()
	time.Sleep(150 * time.Millisecond)
	cancel()
	assert.Equal(t, before, canaries(), "no canary after a failed probe")

	all := told()
	require.Equal(t, lifecycle.Healthy{Run: 3}, all[0])
	seen := false
	for i, ev := range all[1:] {
		p := ev.(lifecycle.Probed)
		switch {
		case p.Canary:
			assert.ErrorContains(t, p.Err, "answered 500")
			assert.Equal(t, lifecycle.Probed{Run: 3}, all[i], "a canary follows a good probe")
			seen = true
		case seen && p.Err == nil && i+2 < len(all):
			next, _ := all[i+2].(lifecycle.Probed)
			assert.True(t, next.Canary, "after a failed canary, one follows each good probe")
		}
	}
}
