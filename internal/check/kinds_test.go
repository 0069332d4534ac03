package check_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/check"
	"github.com/llorch/pool-managerd/internal/check/probe"
	"github.com/llorch/pool-managerd/internal/check/progress"
	"github.com/llorch/pool-managerd/internal/check/warmup"
	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/lifecycle"
)

// The kinds together on one engine: the probe's first good look is
// Healthy, the warm-up answers when asked, and every later good probe is
// followed by a metrics read; a pool without a stall check or a warm-up
// has only the probe's goroutine, and none is left once the run ends.
func TestTheKindsOnOneEngine(t *testing.T) {
	var loading atomic.Int32
	loading.Store(3)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/health":
			if loading.Add(-1) >= 0 {
				w.WriteHeader(http.StatusServiceUnavailable)
			}
		case "/metrics":
			w.Write([]byte("llamacpp:requests_processing 0\nllamacpp:n_decode_total 3\n"))
		case "/completion":
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	kinds := []check.Kind{probe.Kind, progress.Kind, warmup.Kind}
	h := config.Health{Interval: 30 * time.Millisecond, Timeout: 30 * time.Millisecond, StartTimeout: 10 * time.Second,
		ProgressURL: srv.URL + "/metrics", Stall: time.Second,
		Warmup: &config.WarmupRequest{Method: "POST", Path: "/completion"}, WarmupTimeout: time.Second}
	var verified atomic.Int32
	tgt := check.Target{Run: 8, Owned: func(_, _ netip.AddrPort) error { verified.Add(1); return nil }}
	var mu sync.Mutex
	var evs []lifecycle.Event
	tell := func(ev lifecycle.Event) { mu.Lock(); evs = append(evs, ev); mu.Unlock() }
	told := func() []lifecycle.Event { mu.Lock(); defer mu.Unlock(); return append([]lifecycle.Event(nil), evs...) }
	// A beat (a good look after a good look) is not told; it is marked
	// here, in order with what is.
	tgt.Beat = func(time.Time) { tell(nil) }

	ctx, cancel := context.WithCancel(context.Background())
	r := check.Start(ctx, kinds, check.Config{HealthURL: srv.URL + "/health", Health: h}, tgt, time.Time{}, tell)
	assert.Equal(t, 2, workers(), "the probe and the stall check")
	require.Eventually(t, func() bool { return len(told()) > 0 }, 5*time.Second, time.Millisecond)
	assert.Equal(t, lifecycle.Healthy{Run: 8}, told()[0])
	r.Trigger(warmup.Name)
	require.Eventually(t, func() bool { return len(told()) >= 8 }, 5*time.Second, time.Millisecond)
	cancel()
	require.Eventually(t, func() bool { return workers() == 0 }, 5*time.Second, time.Millisecond)

	var seq []string
	for _, ev := range told()[1:] {
		switch ev := ev.(type) {
		case lifecycle.WarmedUp:
			assert.NoError(t, ev.Err)
			seq = append(seq, "warmed")
		case nil:
			seq = append(seq, "beat")
		case lifecycle.Progress:
			assert.Equal(t, lifecycle.Progress{Run: 8, Tokens: 3}, ev)
			seq = append(seq, "progress")
		default:
			t.Errorf("unexpected %#v", ev)
		}
	}
	warmed := 0
	var rest []string
	for _, k := range seq {
		if k == "warmed" {
			warmed++
		} else {
			rest = append(rest, k)
		}
	}
	assert.Equal(t, 1, warmed)
	for i := 0; i+1 < len(rest); i += 2 {
		assert.Equal(t, []string{"beat", "progress"}, rest[i:i+2], "each good probe is followed by a read: %v", rest)
	}
	// 4 start looks, the warm-up, each probe of the healthy engine and
	// each metrics read were verified.
	reads, probes := 0, 0
	for _, k := range rest {
		switch k {
		case "progress":
			reads++
		case "beat":
			probes++
		}
	}
	assert.Equal(t, int32(4+1+probes+reads), verified.Load())

	plain := check.Config{HealthURL: srv.URL + "/health", Health: config.Health{Interval: time.Second, Timeout: time.Second, StartTimeout: time.Second}}
	ctx, cancel = context.WithCancel(context.Background())
	check.Start(ctx, kinds, plain, tgt, time.Time{}, func(lifecycle.Event) {})
	assert.Equal(t, 1, workers(), "the probe alone")
	cancel()
	require.Eventually(t, func() bool { return workers() == 0 }, 5*time.Second, time.Millisecond)
}

// A good look after a good look changes nothing: it is a beat, not told
// to the pool's loop; a failed look is told, and so is the good one after
// it (it clears the failure), and the next good one is a beat again.
func TestOnlyAProbeThatChangesSomethingIsTold(t *testing.T) {
	answers := []int{200, 200, 200, 500, 200, 200}
	var n atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		i := int(n.Add(1)) - 1
		if i >= len(answers) {
			i = len(answers) - 1
		}
		w.WriteHeader(answers[i])
	}))
	defer srv.Close()
	var mu sync.Mutex
	var seq []string
	add := func(k string) { mu.Lock(); seq = append(seq, k); mu.Unlock() }
	got := func() []string { mu.Lock(); defer mu.Unlock(); return append([]string(nil), seq...) }
	var beatAt time.Time
	tgt := check.Target{Run: 3, Beat: func(at time.Time) { mu.Lock(); beatAt = at; seq = append(seq, "beat"); mu.Unlock() }}
	h := config.Health{Interval: 20 * time.Millisecond, Timeout: time.Second, StartTimeout: 10 * time.Second}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	start := time.Now()
	check.Start(ctx, []check.Kind{probe.Kind}, check.Config{HealthURL: srv.URL + "/health", Health: h}, tgt, time.Time{}, func(ev lifecycle.Event) {
		switch ev := ev.(type) {
		case lifecycle.Healthy:
			add("healthy")
		case lifecycle.Probed:
			if ev.Err != nil {
				add("failed")
			} else {
				add("good")
			}
		default:
			add(fmt.Sprintf("%T", ev))
		}
	})
	require.Eventually(t, func() bool { return len(got()) >= 7 }, 5*time.Second, time.Millisecond)
	cancel()
	assert.Equal(t, []string{"healthy", "beat", "beat", "failed", "good", "beat", "beat"}, got()[:7])
	mu.Lock()
	assert.True(t, beatAt.After(start), "a beat carries its look's time")
	mu.Unlock()
}

// workers counts the goroutines of runs' checks: those the check package
// started.
func workers() int {
	buf := make([]byte, 1<<20)
	n := 0
	for g := range strings.SplitSeq(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
		if strings.Contains(g, "\ncreated by github.com/llorch/pool-managerd/internal/check.") {
			n++
		}
	}
	return n
}
