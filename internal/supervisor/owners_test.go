package supervisor_test

import (
	"log/slog"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/assert"

	"github.com/llorch/pool-managerd/internal/metrics"
	. "github.com/llorch/pool-managerd/internal/supervisor"
)

// Every connection that leaves the bus is told to every pool: one that
// never asked a pool for a lease must cost the pool nothing, not a trip
// through its loop (here no loop runs at all, so such a trip would hang).
func TestReleaseOwnerOfAStrangerLeavesTheLoopAlone(t *testing.T) {
	s := New(Config{Pool: "quiet"}, nil, slog.New(slog.DiscardHandler), metrics.New(prometheus.NewRegistry()))
	released := func(owner string) int {
		t.Helper()
		done := make(chan int, 1)
		go func() { done <- s.ReleaseOwner(owner) }()
		select {
		case n := <-done:
			return n
		case <-time.After(5 * time.Second):
			t.Fatalf("ReleaseOwner(%q) waited for a loop", owner)
			return 0
		}
	}
	assert.Zero(t, released(":1.99"))
	assert.Zero(t, released(":1.99"), "nor the second time")
	// An owner's departure that does reach the loop: TestLeasesUnderConcurrency.
}
