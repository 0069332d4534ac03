package bdd

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
)

// entry is one captured log record with its attributes flattened.
type entry struct {
	level  slog.Level
	msg    string
	fields map[string]string
}

// capture is a slog.Handler that keeps every record, so scenarios assert on
// what the daemon would write to the journal.
type capture struct {
	mu      *sync.Mutex
	entries *[]entry
	attrs   []slog.Attr
}

func newCapture() *capture { return &capture{mu: &sync.Mutex{}, entries: &[]entry{}} }

func (c *capture) Enabled(context.Context, slog.Level) bool { return true }

func (c *capture) Handle(_ context.Context, r slog.Record) error {
	e := entry{level: r.Level, msg: r.Message, fields: map[string]string{}}
	for _, a := range c.attrs {
		e.fields[a.Key] = fmt.Sprint(a.Value.Resolve().Any())
	}
	r.Attrs(func(a slog.Attr) bool {
		e.fields[a.Key] = fmt.Sprint(a.Value.Resolve().Any())
		return true
	})
	c.mu.Lock()
	defer c.mu.Unlock()
	*c.entries = append(*c.entries, e)
	return nil
}

func (c *capture) WithAttrs(as []slog.Attr) slog.Handler {
	return &capture{mu: c.mu, entries: c.entries, attrs: append(append([]slog.Attr{}, c.attrs...), as...)}
}

func (c *capture) WithGroup(string) slog.Handler { return c }

func (c *capture) all() []entry {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]entry(nil), *c.entries...)
}
