package engine

import (
	"io"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/shim"
)

// Anything from the shim but a fault or an exit makes it lost, with the
// reason; a fault before is still heard.
func TestBadReportsMakeTheShimLost(t *testing.T) {
	cases := []struct {
		name, stream, why string
	}{
		{"end without exit", `{"event":"fault","line":"CUDA error: x"}` + "\n", LostVanished},
		{"oversized line", strings.Repeat("x", shim.MaxMessage+1) + "\n", "report from the shim over 16384 bytes"},
		{"no newline, ever", strings.Repeat("x", 1<<20), "report from the shim over 16384 bytes"},
		{"garbage JSON", "{\"event\":\"exit\",\n", "malformed report from the shim"},
		{"unknown event", `{"event":"gone","status":0}` + "\n", "malformed report from the shim: unknown event"},
		{"a second start", `{"event":"started","pid":4711}` + "\n", `malformed report from the shim: "started" after the start`},
		{"the shim failed", `{"event":"error","error":"wait: no child"}` + "\n", "the shim failed: wait: no child"},
	}
	for _, c := range cases {
		e := &Engine{events: make(chan Event, 4)}
		go e.forward(shim.NewReader(strings.NewReader(c.stream)), io.NopCloser(nil))
		var exit *lifecycle.Exit
		deadline := time.After(5 * time.Second)
	read:
		for {
			select {
			case ev, ok := <-e.events:
				if !ok {
					break read
				}
				if ev.Exit != nil {
					exit = ev.Exit
				}
			case <-deadline:
				t.Fatalf("%s: no end", c.name)
			}
		}
		require.NotNil(t, exit, c.name)
		assert.True(t, exit.Lost, c.name)
		assert.Contains(t, exit.LostWhy, c.why, c.name)
	}
}
