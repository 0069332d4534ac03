// Package capture gives behaviour scenarios what the daemon writes: a slog
// handler that keeps every record, and series lookups on a registry.
package capture

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
)

// Entry is one captured log record with its attributes flattened.
type Entry struct {
	Level  slog.Level
	Msg    string
	Fields map[string]string
}

// Log is a slog.Handler that keeps every record, so scenarios assert on
// what the daemon would write to the journal.
type Log struct {
	mu      *sync.Mutex
	entries *[]Entry
	attrs   []slog.Attr
}

// NewLog returns an empty capture.
func NewLog() *Log { return &Log{mu: &sync.Mutex{}, entries: &[]Entry{}} }

func (c *Log) Enabled(context.Context, slog.Level) bool { return true }

func (c *Log) Handle(_ context.Context, r slog.Record) error {
	e := Entry{Level: r.Level, Msg: r.Message, Fields: map[string]string{}}
	for _, a := range c.attrs {
		e.Fields[a.Key] = fmt.Sprint(a.Value.Resolve().Any())
	}
	r.Attrs(func(a slog.Attr) bool {
		e.Fields[a.Key] = fmt.Sprint(a.Value.Resolve().Any())
		return true
	})
	c.mu.Lock()
	defer c.mu.Unlock()
	*c.entries = append(*c.entries, e)
	return nil
}

func (c *Log) WithAttrs(as []slog.Attr) slog.Handler {
	return &Log{mu: c.mu, entries: c.entries, attrs: append(append([]slog.Attr{}, c.attrs...), as...)}
}

func (c *Log) WithGroup(string) slog.Handler { return c }

// All returns the records so far.
func (c *Log) All() []Entry {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Entry(nil), *c.entries...)
}
