// Package witness makes systemd the second witness of every engine exit:
// one subscription on the system bus to the state of the engines' scopes
// (pool-engine-*.scope), told per unit as typed events. It sees what the
// shim cannot: the whole scope killed, an operator's stop, an OOM kill
// systemd counts, a scope gone with no report.
package witness

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/godbus/dbus/v5"

	api "github.com/llorch/pool-managerd/dbus"
)

// The scopes watched are named UnitPrefix + ... + UnitSuffix (as
// engine.UnitName makes them); no other unit gives an event.
const (
	UnitPrefix = "pool-engine-"
	UnitSuffix = ".scope"
)

const (
	systemdName    = "org.freedesktop.systemd1"
	systemdPath    = dbus.ObjectPath("/org/freedesktop/systemd1")
	manager        = "org.freedesktop.systemd1.Manager"
	unitIface      = "org.freedesktop.systemd1.Unit"
	scopeIface     = "org.freedesktop.systemd1.Scope"
	unitNamespace  = dbus.ObjectPath("/org/freedesktop/systemd1/unit")
	unitPathPrefix = string(unitNamespace) + "/"
	propsChanged   = "org.freedesktop.DBus.Properties.PropertiesChanged"
	busDriver      = "org.freedesktop.DBus"
)

// ourPaths is the start of our scopes' object paths.
var ourPaths = unitPathPrefix + api.PathEncode(UnitPrefix)

// Ours says whether unit is one of the engines' scopes.
func Ours(unit string) bool {
	return strings.HasPrefix(unit, UnitPrefix) && strings.HasSuffix(unit, UnitSuffix) && len(unit) > len(UnitPrefix)+len(UnitSuffix)
}

// ErrLost is Err once the connection to the bus is gone: from then on
// systemd is no witness.
var ErrLost = errors.New("witness: the connection to the system bus was lost")

// Witness holds one connection to the system bus, subscribed to systemd's
// signals, and what it saw of each of our scopes.
type Witness struct {
	conn *dbus.Conn
	sigs chan *dbus.Signal

	mu       sync.Mutex
	systemd  string // systemd's unique name: the only sender believed
	units    map[string]*tracker
	watchers map[string][]*watcher
	queue    []Event
	closing  bool
	err      error
	// reloading: systemd said Reloading(true) (a daemon-reload or
	// daemon-reexec) and not yet Reloading(false). It unloads every unit
	// and loads it again from its serialized state, telling UnitRemoved
	// of each: a running scope's UnitRemoved then is no unload, and the
	// scope's state is asked once the reload is over (held).
	reloading   bool
	reloadSince time.Time
	held        []string

	wake chan struct{}
	read chan struct{} // closed when the reader ended
	done chan struct{} // closed when every event was handed out
}

type watcher struct{ fn func(Event) }

// New connects to the system bus, subscribes to systemd's signals and
// starts watching. ctx bounds the setup only.
func New(ctx context.Context) (*Witness, error) {
	conn, err := dbus.ConnectSystemBus()
	if err != nil {
		return nil, fmt.Errorf("witness: connecting to the system bus: %w", err)
	}
	w := &Witness{
		conn: conn,
		// Large: godbus hands a signal that does not fit to a goroutine
		// of its own, and the order is lost.
		sigs:     make(chan *dbus.Signal, 4096),
		units:    map[string]*tracker{},
		watchers: map[string][]*watcher{},
		wake:     make(chan struct{}, 1),
		read:     make(chan struct{}),
		done:     make(chan struct{}),
	}
	if err := w.subscribe(ctx); err != nil {
		conn.Close()
		return nil, err
	}
	go w.readLoop()
	go w.deliverLoop()
	return w, nil
}

func (w *Witness) subscribe(ctx context.Context) error {
	w.conn.Signal(w.sigs)
	fromSystemd := dbus.WithMatchSender(systemdName)
	matches := [][]dbus.MatchOption{
		// Every unit's PropertiesChanged: a path namespace cannot name a
		// prefix of a path element, so our scopes are picked out here.
		{fromSystemd, dbus.WithMatchInterface("org.freedesktop.DBus.Properties"), dbus.WithMatchMember("PropertiesChanged"),
			dbus.WithMatchPathNamespace(unitNamespace), dbus.WithMatchArg(0, unitIface)},
		{fromSystemd, dbus.WithMatchInterface("org.freedesktop.DBus.Properties"), dbus.WithMatchMember("PropertiesChanged"),
			dbus.WithMatchPathNamespace(unitNamespace), dbus.WithMatchArg(0, scopeIface)},
		{fromSystemd, dbus.WithMatchObjectPath(systemdPath), dbus.WithMatchInterface(manager), dbus.WithMatchMember("UnitRemoved")},
		{fromSystemd, dbus.WithMatchObjectPath(systemdPath), dbus.WithMatchInterface(manager), dbus.WithMatchMember("JobRemoved")},
		{fromSystemd, dbus.WithMatchObjectPath(systemdPath), dbus.WithMatchInterface(manager), dbus.WithMatchMember("Reloading")},
		// systemd's unique name changes when it re-executes.
		{dbus.WithMatchSender(busDriver), dbus.WithMatchInterface(busDriver), dbus.WithMatchMember("NameOwnerChanged"), dbus.WithMatchArg(0, systemdName)},
	}
	for _, m := range matches {
		if err := w.conn.AddMatchSignalContext(ctx, m...); err != nil {
			return fmt.Errorf("witness: adding a match for systemd's signals: %w", err)
		}
	}
	var owner string
	if err := w.conn.BusObject().CallWithContext(ctx, busDriver+".GetNameOwner", 0, systemdName).Store(&owner); err != nil {
		return fmt.Errorf("witness: who is systemd on the bus: %w", err)
	}
	w.systemd = owner
	// Without a subscriber systemd sends no unit or job signals to the bus.
	if err := w.conn.Object(systemdName, systemdPath).CallWithContext(ctx, manager+".Subscribe", 0).Err; err != nil {
		return fmt.Errorf("witness: subscribing to systemd's signals: %w", err)
	}
	return nil
}

// Watch hands every event of unit to fn, in order, from one goroutine
// shared by all units: fn must not block. cancel stops it.
func (w *Witness) Watch(unit string, fn func(Event)) (cancel func()) {
	wt := &watcher{fn: fn}
	w.mu.Lock()
	w.watchers[unit] = append(w.watchers[unit], wt)
	w.mu.Unlock()
	return func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		l := w.watchers[unit]
		for i, x := range l {
			if x == wt {
				l = append(l[:i], l[i+1:]...)
				break
			}
		}
		if len(l) == 0 {
			delete(w.watchers, unit)
		} else {
			w.watchers[unit] = l
		}
	}
}

// Stop is a stop the daemon announced with ExpectStop. A nil *Stop does
// nothing, so a Runtime without a witness needs no checks.
type Stop struct {
	w    *Witness
	unit string
	m    *mark
}

// ExpectStop announces that the daemon is about to ask systemd to stop
// unit: the next stop of it is ours, not an operator's. Call it before
// StopUnit, then Job with the job StopUnit returned, or Cancel if it
// failed.
func (w *Witness) ExpectStop(unit string) *Stop {
	if w == nil {
		return nil
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return &Stop{w: w, unit: unit, m: w.tracker(unit).expect()}
}

// Job tells the stop's job: the mark then covers that job only, and goes
// with it.
func (s *Stop) Job(id uint32) {
	if s == nil {
		return
	}
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	if t := s.w.units[s.unit]; t != nil {
		t.bind(s.m, id)
	}
}

// Cancel withdraws the mark: the stop was not asked for.
func (s *Stop) Cancel() {
	if s == nil {
		return
	}
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	if t := s.w.units[s.unit]; t != nil {
		t.forget(s.m)
		if t.idle() {
			delete(s.w.units, s.unit)
		}
	}
}

func (w *Witness) tracker(unit string) *tracker {
	t := w.units[unit]
	if t == nil {
		t = &tracker{unit: unit}
		w.units[unit] = t
	}
	return t
}

// Done is closed once the witness stopped: Close, or the bus connection
// lost (then Err says so).
func (w *Witness) Done() <-chan struct{} { return w.done }

// Err is ErrLost after the connection dropped; nil while running and
// after Close.
func (w *Witness) Err() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

// Close drops the subscription and the connection; events not yet handed
// out are dropped.
func (w *Witness) Close() error {
	w.mu.Lock()
	w.closing = true
	w.mu.Unlock()
	err := w.conn.Close()
	<-w.done
	return err
}

func (w *Witness) readLoop() {
	defer close(w.read)
	for sig := range w.sigs {
		w.handle(sig)
		w.mu.Lock()
		overdue := w.reloading && time.Since(w.reloadSince) > reloadMax
		w.mu.Unlock()
		if overdue {
			// Reloading(false) never came (the systemd that began
			// the reload is gone): the held scopes are asked now.
			w.endReload()
		}
	}
	w.mu.Lock()
	if !w.closing {
		w.err = ErrLost
	}
	w.mu.Unlock()
}

// handle reads one signal, in the order systemd sent them.
func (w *Witness) handle(sig *dbus.Signal) {
	now := time.Now()
	w.mu.Lock()
	if owner, ok := nameOwnerChanged(sig); ok {
		w.systemd = owner
		w.mu.Unlock()
		if owner != "" {
			// A re-executed systemd keeps its subscribers, a new
			// one does not.
			go w.conn.Object(systemdName, systemdPath).Call(manager+".Subscribe", 0)
		}
		return
	}
	if on, ok := reloadingSignal(sig, w.systemd); ok {
		switch {
		case on && !w.reloading:
			w.reloading, w.reloadSince = true, now
		case !on && w.reloading:
			w.mu.Unlock()
			w.endReload()
			return
		}
		w.mu.Unlock()
		return
	}
	unit, o, ok := parse(sig, w.systemd)
	if !ok {
		w.mu.Unlock()
		return
	}
	t := w.units[unit]
	if o.kind == obsUnitRemoved && w.reloading && t != nil && t.known {
		// Unloaded to be loaded again from what systemd serialized:
		// what became of the scope is asked after the reload.
		if !slices.Contains(w.held, unit) {
			w.held = append(w.held, unit)
		}
		w.mu.Unlock()
		return
	}
	w.observe(unit, o, now)
	w.mu.Unlock()
	w.wakeDeliver()
}

// reloadMax bounds a reload: past it, a Reloading(false) is no longer
// waited for.
const reloadMax = 2 * time.Minute

// observe feeds one observation to the unit's tracker; w.mu is held.
func (w *Witness) observe(unit string, o observation, now time.Time) {
	t := w.units[unit]
	if t == nil && (o.kind == obsUnit || o.kind == obsScope) {
		t = w.tracker(unit)
	}
	if t != nil {
		w.queue = append(w.queue, t.observe(o, now)...)
		if t.idle() {
			delete(w.units, unit)
		}
	}
}

func (w *Witness) wakeDeliver() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// endReload asks systemd, once its reload is over, the state of each
// scope it unloaded during the reload, and feeds that to the trackers as
// if signalled: a scope still running with the same invocation gives no
// event; one that ended or is gone is told as such. The signals systemd
// sent before its answers are read first (they are older): an answer
// about a scope they already told gone is dropped. Called without w.mu.
func (w *Witness) endReload() {
	w.mu.Lock()
	held := w.held
	w.reloading, w.held = false, nil
	w.mu.Unlock()
	if len(held) == 0 {
		return
	}
	for _, unit := range held {
		obs, ok := w.ask(unit)
		// godbus hands over the signals it read before a reply before
		// the reply itself.
		for n := len(w.sigs); n > 0; n-- {
			sig, open := <-w.sigs
			if !open {
				return
			}
			w.handle(sig)
		}
		if !ok {
			// No answer: the shim's word stands alone.
			continue
		}
		now := time.Now()
		w.mu.Lock()
		if t := w.units[unit]; t != nil && t.known && !slices.Contains(w.held, unit) {
			for _, o := range obs {
				w.observe(unit, o, now)
			}
		}
		w.mu.Unlock()
		w.wakeDeliver()
	}
}

// ask reads a unit's state from systemd as observations; ok is false
// when systemd did not answer.
func (w *Witness) ask(unit string) (obs []observation, ok bool) {
	ctx, cancel := context.WithTimeout(context.Background(), askTimeout)
	defer cancel()
	sd := w.conn.Object(systemdName, systemdPath)
	var path dbus.ObjectPath
	err := sd.CallWithContext(ctx, manager+".GetUnit", 0, unit).Store(&path)
	var de dbus.Error
	if errors.As(err, &de) && de.Name == "org.freedesktop.systemd1.NoSuchUnit" {
		return []observation{{kind: obsUnitRemoved}}, true
	}
	if err != nil {
		return nil, false
	}
	u := w.conn.Object(systemdName, path)
	var props map[string]dbus.Variant
	if err := u.CallWithContext(ctx, "org.freedesktop.DBus.Properties.GetAll", 0, unitIface).Store(&props); err != nil {
		return nil, false
	}
	if ls, _ := props["LoadState"].Value().(string); ls == "not-found" {
		return []observation{{kind: obsUnitRemoved}}, true
	}
	o := unitObservation(props)
	if ended(o.active) {
		// How it ended, as the Scope's PropertiesChanged would have
		// said before the Unit's.
		var res dbus.Variant
		if u.CallWithContext(ctx, "org.freedesktop.DBus.Properties.Get", 0, scopeIface, "Result").Store(&res) == nil {
			r, _ := res.Value().(string)
			obs = append(obs, observation{kind: obsScope, result: r})
		}
	}
	return append(obs, o), true
}

// askTimeout bounds the questions to systemd after a reload.
const askTimeout = 5 * time.Second

func (w *Witness) deliverLoop() {
	defer close(w.done)
	for {
		select {
		case <-w.wake:
		case <-w.read:
			w.mu.Lock()
			if w.closing {
				w.mu.Unlock()
				return
			}
			w.mu.Unlock()
			w.deliver()
			return
		}
		w.deliver()
	}
}

func (w *Witness) deliver() {
	for {
		w.mu.Lock()
		q := w.queue
		w.queue = nil
		type call struct {
			fn func(Event)
			ev Event
		}
		var calls []call
		for _, ev := range q {
			for _, wt := range w.watchers[ev.Unit] {
				calls = append(calls, call{wt.fn, ev})
			}
		}
		w.mu.Unlock()
		if len(q) == 0 {
			return
		}
		for _, c := range calls {
			c.fn(c.ev)
		}
	}
}

// unitObservation reads the Unit properties the tracker follows.
func unitObservation(props map[string]dbus.Variant) observation {
	o := observation{kind: obsUnit}
	o.active, _ = props["ActiveState"].Value().(string)
	o.sub, _ = props["SubState"].Value().(string)
	if id, ok := props["InvocationID"].Value().([]byte); ok && len(id) > 0 {
		o.invocation = hex.EncodeToString(id)
	}
	if us, ok := props["StateChangeTimestamp"].Value().(uint64); ok && us > 0 {
		o.changed = time.UnixMicro(int64(us))
	}
	if j, ok := props["Job"].Value().([]any); ok && len(j) == 2 {
		if id, ok := j[0].(uint32); ok {
			o.job, o.hasJob = id, true
		}
	}
	return o
}

// reloadingSignal reads systemd's Reloading: true when a reload (or a
// re-execution) begins, false once it is over.
func reloadingSignal(sig *dbus.Signal, systemd string) (on, ok bool) {
	if systemd == "" || sig.Sender != systemd || sig.Path != systemdPath || sig.Name != manager+".Reloading" || len(sig.Body) != 1 {
		return false, false
	}
	on, ok = sig.Body[0].(bool)
	return on, ok
}

// nameOwnerChanged reads the bus driver's word on who owns systemd's name.
func nameOwnerChanged(sig *dbus.Signal) (string, bool) {
	if sig.Sender != busDriver || sig.Name != busDriver+".NameOwnerChanged" || len(sig.Body) != 3 {
		return "", false
	}
	name, ok1 := sig.Body[0].(string)
	owner, ok2 := sig.Body[2].(string)
	return owner, ok1 && ok2 && name == systemdName
}

// parse turns a signal into an observation of one of our scopes; ok is
// false for anything else: another sender than systemd (godbus hands every
// signal the connection gets to every channel), another unit, a malformed
// body.
func parse(sig *dbus.Signal, systemd string) (unit string, o observation, ok bool) {
	if systemd == "" || sig.Sender != systemd {
		return "", o, false
	}
	switch sig.Name {
	case propsChanged:
		p := string(sig.Path)
		if !strings.HasPrefix(p, ourPaths) || len(sig.Body) < 2 {
			return "", o, false
		}
		unit, ok = api.PathDecode(p, string(unitNamespace))
		iface, ok1 := sig.Body[0].(string)
		props, ok2 := sig.Body[1].(map[string]dbus.Variant)
		if !ok || !ok1 || !ok2 || !Ours(unit) {
			return "", o, false
		}
		switch iface {
		case scopeIface:
			o.kind = obsScope
			o.result, _ = props["Result"].Value().(string)
		case unitIface:
			o = unitObservation(props)
		default:
			return "", o, false
		}
		return unit, o, true
	case manager + ".JobRemoved":
		if sig.Path != systemdPath || len(sig.Body) != 4 {
			return "", o, false
		}
		id, ok1 := sig.Body[0].(uint32)
		unit, ok2 := sig.Body[2].(string)
		res, ok3 := sig.Body[3].(string)
		if !ok1 || !ok2 || !ok3 || !Ours(unit) {
			return "", o, false
		}
		return unit, observation{kind: obsJobRemoved, job: id, jobResult: res}, true
	case manager + ".UnitRemoved":
		if sig.Path != systemdPath || len(sig.Body) != 2 {
			return "", o, false
		}
		unit, ok := sig.Body[0].(string)
		if !ok || !Ours(unit) {
			return "", o, false
		}
		return unit, observation{kind: obsUnitRemoved}, true
	}
	return "", o, false
}
