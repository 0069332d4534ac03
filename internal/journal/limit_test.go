package journal

import (
	"bytes"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// A flood of one kind writes the burst, then one line with the number
// left out when the window ends; another kind has its own budget, and
// the next window writes again.
func TestLimiterWritesABurstThenOneSuppressedLine(t *testing.T) {
	var buf lockedBuffer
	l := NewLimiter(slog.New(slog.NewTextHandler(&buf, nil)), 5, 200*time.Millisecond)
	written := 0
	for range 1000 {
		if l.Warn("forged_signal", "ignored a forged signal", Sender, ":1.9") {
			written++
		}
	}
	assert.Equal(t, 5, written)
	assert.True(t, l.Warn("access_denied", "access denied"), "another kind has its own budget")
	assert.Equal(t, 5, strings.Count(buf.String(), `msg="ignored a forged signal"`))
	assert.NotContains(t, buf.String(), "suppressed", "not before the window ends")
	require.Eventually(t, func() bool { return strings.Contains(buf.String(), "suppressed") }, 2*time.Second, 10*time.Millisecond)
	assert.Contains(t, buf.String(), `msg="warnings caused by others suppressed (rate limit)" WARNING_KIND=forged_signal SUPPRESSED=995 TIME_WINDOW_SEC=0.2`)
	assert.Equal(t, 1, strings.Count(buf.String(), "suppressed"))
	assert.True(t, l.Warn("forged_signal", "ignored a forged signal"), "a new window writes again")
	assert.Equal(t, 6, strings.Count(buf.String(), `msg="ignored a forged signal"`))
}
