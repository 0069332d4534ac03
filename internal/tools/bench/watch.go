package main

import (
	"fmt"
	"time"

	"github.com/godbus/dbus/v5"
)

// change is one PropertiesChanged, stamped when this process received it.
type change struct {
	at      time.Time
	path    dbus.ObjectPath
	changed map[string]dbus.Variant
}

// watcher stamps the PropertiesChanged signals a match lets through, as a
// client of the daemon would see them. Only while a figure needs them:
// decoding signals costs the client time that other figures measure.
type watcher struct {
	conn *dbus.Conn
	opts []dbus.MatchOption
	raw  chan *dbus.Signal
	out  chan change
	done chan struct{}
}

func watch(conn *dbus.Conn, opts ...dbus.MatchOption) *watcher {
	opts = append([]dbus.MatchOption{dbus.WithMatchInterface("org.freedesktop.DBus.Properties"), dbus.WithMatchMember("PropertiesChanged")}, opts...)
	w := &watcher{conn: conn, opts: opts, raw: make(chan *dbus.Signal, 4096), out: make(chan change, 8192), done: make(chan struct{})}
	conn.Signal(w.raw)
	must(conn.AddMatchSignal(opts...))
	go func() {
		for {
			select {
			case s := <-w.raw:
				at := time.Now()
				if len(s.Body) < 2 {
					continue
				}
				changed, _ := s.Body[1].(map[string]dbus.Variant)
				select {
				case w.out <- change{at, s.Path, changed}:
				default: // nobody reads: a figure that does not wait on signals
				}
			case <-w.done:
				return
			}
		}
	}()
	return w
}

func (w *watcher) close() {
	w.conn.RemoveMatchSignal(w.opts...)
	w.conn.RemoveSignal(w.raw)
	close(w.done)
}

// drain forgets what came so far.
func (w *watcher) drain() {
	time.Sleep(time.Millisecond)
	for {
		select {
		case <-w.out:
		default:
			return
		}
	}
}

// until returns the first change on path for which ok holds.
func (w *watcher) until(path dbus.ObjectPath, timeout time.Duration, what string, ok func(c change) bool) change {
	t := time.NewTimer(timeout)
	defer t.Stop()
	for {
		select {
		case c := <-w.out:
			if c.path == path && ok(c) {
				return c
			}
		case <-t.C:
			must(fmt.Errorf("%s: no such change on %s within %s", what, path, timeout))
		}
	}
}

// seen returns the first change for which ok holds, on any path; false
// after timeout (for breakdowns, which a coalesced signal may miss).
func (w *watcher) seen(timeout time.Duration, ok func(c change) bool) (change, bool) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	for {
		select {
		case c := <-w.out:
			if ok(c) {
				return c, true
			}
		case <-t.C:
			return change{}, false
		}
	}
}

// prop returns the first change on path that carries prop (with want's
// value, unless want is nil).
func (w *watcher) prop(path dbus.ObjectPath, prop string, want any, timeout time.Duration) change {
	return w.until(path, timeout, fmt.Sprintf("%s=%v", prop, want), func(c change) bool {
		v, ok := c.changed[prop]
		return ok && (want == nil || v.Value() == want)
	})
}

// has reports whether c carries prop with the value want.
func (c change) has(prop string, want any) bool {
	v, ok := c.changed[prop]
	return ok && v.Value() == want
}
