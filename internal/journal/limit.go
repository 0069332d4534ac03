package journal

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// Limits of the warnings other users cause: at most LimitBurst of a kind
// each LimitWindow, then one line saying how many were left out. journald
// drops a unit's entries beyond its own rate limit, crash and breaker
// entries included, so nobody may spend that budget through the daemon.
const (
	LimitBurst  = 5
	LimitWindow = 10 * time.Second
)

// Limiter writes warnings that other users can cause at will (refused bus
// calls, forged signals, XIDs of foreign processes), at most burst of a
// kind per window; the rest are counted and reported in one line when
// the window ends.
type Limiter struct {
	log    *slog.Logger
	burst  int
	window time.Duration

	mu    sync.Mutex
	kinds map[string]*window
}

type window struct {
	start      time.Time
	written    int
	suppressed int
}

// NewLimiter is a Limiter of burst warnings of a kind per window on log.
func NewLimiter(log *slog.Logger, burst int, every time.Duration) *Limiter {
	return &Limiter{log: log, burst: burst, window: every, kinds: map[string]*window{}}
}

// Warn writes a warning of kind (a fixed word naming what caused it),
// unless burst of them were written in this window; it reports whether
// it was written.
func (l *Limiter) Warn(kind, msg string, args ...any) bool {
	return l.Log(context.Background(), slog.LevelWarn, kind, msg, args...)
}

// Log is Warn at another level.
func (l *Limiter) Log(ctx context.Context, level slog.Level, kind, msg string, args ...any) bool {
	now := time.Now()
	l.mu.Lock()
	w := l.kinds[kind]
	if w == nil || now.Sub(w.start) >= l.window && w.suppressed == 0 {
		w = &window{start: now}
		l.kinds[kind] = w
	}
	if w.written >= l.burst {
		if w.suppressed++; w.suppressed == 1 {
			time.AfterFunc(l.window-now.Sub(w.start), func() { l.flush(kind, w) })
		}
		l.mu.Unlock()
		return false
	}
	w.written++
	l.mu.Unlock()
	l.log.Log(ctx, level, msg, append(args, WarningKind, kind)...)
	return true
}

// flush ends a window in which warnings were left out: one line says how
// many, and the next window begins.
func (l *Limiter) flush(kind string, w *window) {
	l.mu.Lock()
	n := w.suppressed
	if l.kinds[kind] == w {
		delete(l.kinds, kind)
	}
	l.mu.Unlock()
	l.log.Warn("warnings caused by others suppressed (rate limit)", WarningKind, kind, Suppressed, n,
		TimeWindowSec, l.window.Seconds())
}
