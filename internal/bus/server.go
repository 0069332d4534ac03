// Package bus is pool-managerd's D-Bus surface, org.llorch.PoolManager1: a
// thin layer over the manager that checks arguments and callers, ties
// leases to the caller's connection, and publishes each pool's state as
// properties with PropertiesChanged.
package bus

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os/user"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/godbus/dbus/v5/introspect"
	"github.com/godbus/dbus/v5/prop"

	shipped "github.com/llorch/pool-managerd/dbus"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/manager"
	"github.com/llorch/pool-managerd/internal/model"
	"github.com/llorch/pool-managerd/internal/safetext"
	"github.com/llorch/pool-managerd/internal/supervisor"
)

// Server serves the manager on a bus connection.
type Server struct {
	conn     *dbus.Conn
	mgr      *manager.Manager
	log      *slog.Logger
	ctx      context.Context
	adminGID int // -1: no admin group on this host

	mu    sync.Mutex
	pools map[string]context.CancelFunc // stops a pool's publisher
	// callers caches each connection's verdict: unique names are never
	// reused while the bus runs, and an entry goes when its name leaves.
	callers map[string]caller
	left    departures
	hooks   hooks
	// warn writes the warnings other bus users cause, rate-limited.
	warn *journal.Limiter
	// notify tells systemd a configuration reload began; what it returns
	// tells it the reload is over.
	notify func() func()
}

// OnReload sets what tells systemd that a ReloadConfig began and ended
// (RELOADING=1, then READY=1).
func (s *Server) OnReload(notify func() (done func())) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.notify = notify
}

// hooks let a test hold a call at a point of its choosing; all are nil
// outside tests.
type hooks struct {
	acquiring func(sender string) // AcquireLease checked its caller and is about to add the lease
	acquired  func(sender string) // AcquireLease has answered
	left      func(name string)   // a connection's departure has been handled
}

// Serve exports the manager and its pools on conn, watches for callers
// leaving the bus, and then takes the bus name: a caller never finds the
// name without the objects. It runs until ctx ends.
func Serve(ctx context.Context, conn *dbus.Conn, mgr *manager.Manager, log *slog.Logger, adminGroup string) (*Server, error) {
	return serve(ctx, conn, mgr, log, adminGroup, hooks{})
}

func serve(ctx context.Context, conn *dbus.Conn, mgr *manager.Manager, log *slog.Logger, adminGroup string, h hooks) (*Server, error) {
	s := &Server{conn: conn, mgr: mgr, log: log, ctx: ctx, adminGID: -1, pools: map[string]context.CancelFunc{},
		callers: map[string]caller{}, left: newDepartures(), hooks: h,
		warn: journal.NewLimiter(log, journal.LimitBurst, journal.LimitWindow)}
	if g, err := user.LookupGroup(adminGroup); err == nil {
		if gid, err := strconv.Atoi(g.Gid); err == nil {
			s.adminGID = gid
		}
	} else {
		log.Warn(fmt.Sprintf("admin group %q not found: only root may change pools", adminGroup))
	}
	if err := conn.Export(&managerObject{s}, ManagerPath, ManagerIface); err != nil {
		return nil, err
	}
	for _, p := range mgr.Pools() {
		if err := s.exportPool(p); err != nil {
			return nil, err
		}
	}
	if err := exportIntrospection(conn, ManagerPath, shipped.Manager, []string{"pool"}, false); err != nil {
		return nil, err
	}
	if err := s.exportPoolList(); err != nil {
		return nil, err
	}
	if err := s.watchCallers(); err != nil {
		return nil, err
	}
	reply, err := conn.RequestName(Name, dbus.NameFlagDoNotQueue)
	if err != nil {
		return nil, fmt.Errorf("requesting %s: %w", Name, err)
	}
	if reply != dbus.RequestNameReplyPrimaryOwner {
		return nil, fmt.Errorf("%s is already owned on the bus: is another pool-managerd running?", Name)
	}
	return s, nil
}

// exportIntrospection serves introspection data built from the shipped
// XML (so served and shipped cannot differ) plus the standard interfaces.
func exportIntrospection(conn *dbus.Conn, path dbus.ObjectPath, ifaceXML string, children []string, props bool) error {
	node := introspect.Node{Name: string(path)}
	if ifaceXML != "" {
		var n introspect.Node
		if err := xml.Unmarshal([]byte(ifaceXML), &n); err != nil {
			return fmt.Errorf("shipped introspection data: %w", err)
		}
		node.Interfaces = append(node.Interfaces, n.Interfaces...)
	}
	node.Interfaces = append(node.Interfaces, introspect.IntrospectData, peerData)
	if props {
		node.Interfaces = append(node.Interfaces, prop.IntrospectData)
	}
	for _, c := range children {
		node.Children = append(node.Children, introspect.Node{Name: c})
	}
	return conn.Export(introspect.NewIntrospectable(&node), path, "org.freedesktop.DBus.Introspectable")
}

var peerData = introspect.Interface{
	Name: "org.freedesktop.DBus.Peer",
	Methods: []introspect.Method{
		{Name: "Ping"},
		{Name: "GetMachineId", Args: []introspect.Arg{{Name: "machine_uuid", Type: "s", Direction: "out"}}},
	},
}

// snapshot is what a pool's properties are read from.
type snapshot = supervisor.Snapshot

// poolProperties are the Pool interface's properties
// (dbus/org.llorch.PoolManager1.Pool.xml), in its order, each read off a
// snapshot; its Go type is its D-Bus type.
var poolProperties = []property{
	text("Id", func(s snapshot) string { return s.ID }),
	text("State", func(s snapshot) string { return s.State.String() }),
	value("Live", func(s snapshot) bool { return s.Live }),
	value("Ready", func(s snapshot) bool { return s.Ready }),
	value("Draining", func(s snapshot) bool { return s.Draining }),
	value("ActiveLeases", func(s snapshot) uint32 { return s.ActiveLeases }),
	value("Slots", func(s snapshot) uint32 { return s.Slots }),
	text("Model", func(s snapshot) string { return s.Model }),
	text("ModelDigest", func(s snapshot) string { return s.ModelDigest }),
	text("EngineVersion", func(s snapshot) string { return s.EngineVersion }),
	text("DeviceMask", func(s snapshot) string { return s.DeviceMask }),
	text("LastError", func(s snapshot) string { return s.LastError }),
	value("CrashCount", func(s snapshot) uint32 { return uint32(s.Policy.CrashCount) }),
	value("RestartCount", func(s snapshot) uint32 { return uint32(s.Policy.RestartCount) }),
	value("FailureStreak", func(s snapshot) uint32 { return uint32(s.Policy.Streak) }),
	text("BreakerState", func(s snapshot) string { return s.Policy.Breaker.String() }),
	value("NextRestartUSec", func(s snapshot) uint64 {
		if s.NextRestart.IsZero() {
			return 0
		}
		return uint64(s.NextRestart.UnixMicro())
	}),
	text("Unit", func(s snapshot) string { return s.Unit }),
	value("MainPID", func(s snapshot) uint32 { return uint32(s.MainPID) }),
	text("Operation", func(s snapshot) string { return s.Operation }),
	value("Progress", func(s snapshot) float64 { return s.Progress }),
	value("IdleSinceUSec", func(s snapshot) uint64 {
		if s.IdleSince.IsZero() {
			return 0
		}
		return uint64(s.IdleSince.UnixMicro())
	}),
}

// property is one property of the Pool interface.
type property struct {
	name string
	get  func(snapshot) any
}

func value[T bool | uint32 | uint64 | float64](name string, get func(snapshot) T) property {
	return property{name, func(s snapshot) any { return get(s) }}
}

// text is a string property, made safe: one string the bus refuses fails
// the whole PropertiesChanged and leaves GetAll unanswered.
func text(name string, get func(snapshot) string) property {
	return property{name, func(s snapshot) any { return safetext.Bound(get(s)) }}
}

// properties projects a snapshot onto the Pool interface's properties.
func properties(s snapshot) map[string]any {
	m := make(map[string]any, len(poolProperties))
	for _, p := range poolProperties {
		m[p.name] = p.get(s)
	}
	return m
}

// progressEvery bounds how often a change of Progress alone is sent.
const progressEvery = 250 * time.Millisecond

func (s *Server) exportPoolList() error {
	var ids []string
	for _, id := range s.mgr.IDs() {
		ids = append(ids, shipped.PathEncode(id))
	}
	return exportIntrospection(s.conn, PoolPrefix, "", ids, false)
}

// PutPool publishes a pool added by a configuration reload, or the new
// supervisor of a pool whose configuration changed.
func (s *Server) PutPool(p manager.Pool) error {
	s.RemovePool(p.Snapshot().ID)
	if err := s.exportPool(p); err != nil {
		return err
	}
	return s.exportPoolList()
}

// RemovePool takes a pool's object off the bus.
func (s *Server) RemovePool(id string) {
	s.mu.Lock()
	cancel := s.pools[id]
	delete(s.pools, id)
	s.mu.Unlock()
	if cancel == nil {
		return
	}
	cancel()
	path := shipped.PoolPath(id)
	for _, iface := range []string{"org.freedesktop.DBus.Properties", "org.freedesktop.DBus.Introspectable"} {
		if err := s.conn.Export(nil, path, iface); err != nil {
			s.log.Error("cannot take a pool's object off the bus", journal.PoolID, id, journal.Error, err.Error())
		}
	}
	if err := s.exportPoolList(); err != nil {
		s.log.Error("cannot publish the pool list", journal.Error, err.Error())
	}
}

func (s *Server) exportPool(p manager.Pool) error {
	snap := p.Snapshot()
	path := shipped.PoolPath(snap.ID)
	cur := properties(snap)
	m := map[string]*prop.Prop{}
	for k, v := range cur {
		// Changes are announced together, in one signal, by publish.
		m[k] = &prop.Prop{Value: v, Emit: prop.EmitFalse}
	}
	props, err := prop.Export(s.conn, path, prop.Map{PoolIface: m})
	if err != nil {
		return err
	}
	if err := exportIntrospection(s.conn, path, shipped.Pool, nil, true); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(s.ctx)
	s.mu.Lock()
	s.pools[snap.ID] = cancel
	s.mu.Unlock()
	go s.publish(ctx, p, path, props, cur)
	return nil
}

// publish keeps a pool's properties current and sends one
// PropertiesChanged per change with every property that changed, or, for
// a burst of changes of ActiveLeases or Progress alone, one for the burst
// (see announcer). A Get answers the current value at once.
func (s *Server) publish(ctx context.Context, p manager.Pool, path dbus.ObjectPath, props *prop.Properties, last map[string]any) {
	a, id := newAnnouncer(last), p.Snapshot().ID
	for {
		var err error
		wctx, cancel := ctx, context.CancelFunc(func() {})
		if !a.due.IsZero() {
			wctx, cancel = context.WithDeadline(ctx, a.due)
		}
		wait := func(cond func(supervisor.Snapshot) bool) supervisor.Snapshot {
			var snap supervisor.Snapshot
			snap, err = p.Wait(wctx, cond)
			return snap
		}
		_, cur := waitChange(wait, last)
		cancel()
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			// The held changes are due: nothing new.
		default:
			for k, v := range cur {
				if v != last[k] {
					if err := setProp(props, k, v); err != nil {
						s.log.Error("cannot set a pool property", journal.PoolID, id, journal.Property, k, journal.Error, err.Error())
						a.said[k] = v // not announced either
					}
				}
			}
			last = cur
		}
		changed := a.change(time.Now(), last)
		if len(changed) == 0 {
			continue
		}
		if err := s.conn.Emit(path, "org.freedesktop.DBus.Properties.PropertiesChanged", PoolIface, changed, []string{}); err != nil {
			s.log.Error("cannot publish a pool's property changes", journal.PoolID, id, journal.Error, err.Error())
		}
	}
}

// leasesEvery bounds how often a change of ActiveLeases alone is sent: a
// router's lease calls each change it, and a signal for each is encoded
// by the daemon and routed by the bus beside every reply. A change after
// a quiet while is sent at once.
const leasesEvery = 20 * time.Millisecond

// announcer decides what a pool's PropertiesChanged says, and when.
// Changes of ActiveLeases or Progress alone are held while their own
// property was announced less than leasesEvery or progressEvery ago, and
// then sent with their latest values (nothing, if they came back to what
// was said); any other change is sent at once, with whatever was held.
type announcer struct {
	said map[string]any // the values last announced
	// due is when the held changes are sent; zero when none are held.
	due                  time.Time
	leasesAt, progressAt time.Time // when each was last announced
}

func newAnnouncer(said map[string]any) *announcer {
	return &announcer{said: maps.Clone(said)}
}

// change takes the current properties at now and returns those to
// announce now (none: nothing changed, or it is held until a.due).
func (a *announcer) change(now time.Time, cur map[string]any) map[string]dbus.Variant {
	var diff []string
	held := true
	for k, v := range cur {
		if v != a.said[k] {
			diff = append(diff, k)
			held = held && (k == "ActiveLeases" || k == "Progress")
		}
	}
	if len(diff) == 0 {
		a.due = time.Time{}
		return nil
	}
	if held {
		var due time.Time
		for _, k := range diff {
			at, every := a.leasesAt, leasesEvery
			if k == "Progress" {
				at, every = a.progressAt, progressEvery
			}
			if d := at.Add(every); d.After(due) {
				due = d
			}
		}
		if due.After(now) {
			a.due = due
			return nil
		}
	}
	changed := make(map[string]dbus.Variant, len(diff))
	for _, k := range diff {
		changed[k] = dbus.MakeVariant(cur[k])
		a.said[k] = cur[k]
		switch k {
		case "ActiveLeases":
			a.leasesAt = now
		case "Progress":
			a.progressAt = now
		}
	}
	a.due = time.Time{}
	return changed
}

// waitChange waits (through wait, which is Supervisor.Wait's) for a
// snapshot whose properties differ from last, and returns it with its
// properties, projected once: the comparison is the publisher's work
// for every change, on the CPUs a caller's reply needs too.
func waitChange(wait func(cond func(supervisor.Snapshot) bool) supervisor.Snapshot, last map[string]any) (supervisor.Snapshot, map[string]any) {
	var cur map[string]any
	snap := wait(func(s supervisor.Snapshot) bool {
		cur = properties(s)
		return !sameProperties(cur, last)
	})
	return snap, cur
}

// sameProperties compares two projections. Every property's value is a
// bool, a number or a string: == compares them as the bus would, without
// reflection.
func sameProperties(a, b map[string]any) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || v != w {
			return false
		}
	}
	return true
}

// setProp sets a read-only property, which godbus offers only as SetMust:
// a value it cannot store is an error here, not a crash of the daemon.
func setProp(props *prop.Properties, name string, v any) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%v", r)
		}
	}()
	props.SetMust(PoolIface, name, v)
	return nil
}

// Reasons of pool_managerd_bus_rejected_total, also the kinds of their
// rate-limited warnings.
const (
	rejectDenied = "access_denied"
	rejectForged = "forged_signal"
)

// rejected counts a message another bus user sent that the daemon
// refused, and warns of it within the rate limit: anyone may send them at
// will.
func (s *Server) rejected(reason, msg string, args ...any) {
	if m := s.mgr.Metrics(); m != nil {
		m.BusRejected.WithLabelValues(reason).Inc()
		m.Touch()
	}
	s.warn.Warn(reason, msg, args...)
}

// busDriver is the bus itself: the sender of its signals, a name nobody
// else can own.
const busDriver = "org.freedesktop.DBus"

// watchCallers releases a connection's leases when it leaves the bus. Only
// the bus may say so: anyone can send a NameOwnerChanged, to everyone or
// to the daemon alone, and godbus hands every signal to every channel.
func (s *Server) watchCallers() error {
	if err := s.conn.AddMatchSignal(
		dbus.WithMatchSender(busDriver),
		dbus.WithMatchInterface(busDriver),
		dbus.WithMatchMember("NameOwnerChanged"),
		dbus.WithMatchObjectPath("/org/freedesktop/DBus"),
	); err != nil {
		return err
	}
	ch := make(chan *dbus.Signal, 64)
	s.conn.Signal(ch)
	go func() {
		for {
			select {
			case <-s.ctx.Done():
				return
			case sig, ok := <-ch:
				if !ok {
					return // the connection is closed
				}
				if sig.Name != busDriver+".NameOwnerChanged" {
					continue
				}
				if sig.Sender != busDriver || sig.Path != "/org/freedesktop/DBus" {
					s.rejected(rejectForged, "ignored a NameOwnerChanged that the bus did not send", journal.Sender, safetext.Bound(sig.Sender))
					continue
				}
				if name, ok := departed(sig); ok {
					s.callerLeft(name)
				}
			}
		}
	}()
	return nil
}

// departed returns the unique name a NameOwnerChanged says has left.
func departed(sig *dbus.Signal) (string, bool) {
	if len(sig.Body) != 3 {
		return "", false
	}
	name, _ := sig.Body[0].(string)
	newOwner, _ := sig.Body[2].(string)
	return name, newOwner == "" && len(name) > 0 && name[0] == ':'
}

// callerLeft forgets a connection and releases its leases. It is noted as
// gone first: an AcquireLease of it still under way then undoes its lease.
func (s *Server) callerLeft(name string) {
	s.mu.Lock()
	delete(s.callers, name)
	s.left.add(name, time.Now())
	s.mu.Unlock()
	if n := s.mgr.ReleaseOwner(name); n > 0 {
		s.log.Info(fmt.Sprintf("released %d lease(s) of %s: it left the bus", n, name), journal.ActiveLeases, n)
	}
	if s.hooks.left != nil {
		s.hooks.left(name)
	}
}

// Bounds of the memory of departed connections. A departure matters to
// an AcquireLease the bus delivered before it, which runs within
// moments; one still running is never forgotten.
const (
	departedKeep = 5 * time.Minute
	departedMax  = 16384
)

// departures remembers connections that have left the bus. Method calls
// run beside the signal loop, so the departure of a caller can be handled
// before its AcquireLease adds the lease; the lease is then undone.
type departures struct {
	at       map[string]time.Time
	order    []string       // oldest first
	acquires map[string]int // AcquireLease calls under way, by caller
}

func newDepartures() departures {
	return departures{at: map[string]time.Time{}, acquires: map[string]int{}}
}

func (d *departures) add(name string, now time.Time) {
	if _, ok := d.at[name]; ok {
		return
	}
	d.at[name] = now
	d.order = append(d.order, name)
	var kept []string
	for len(d.order) > 0 {
		old := d.order[0]
		if len(d.at) <= departedMax && now.Sub(d.at[old]) < departedKeep {
			break
		}
		d.order = d.order[1:]
		if d.acquires[old] > 0 {
			kept = append(kept, old)
			continue
		}
		delete(d.at, old)
	}
	d.order = append(d.order, kept...)
}

// begin notes an AcquireLease of name under way; false if name has left.
func (d *departures) begin(name string) bool {
	if _, gone := d.at[name]; gone {
		return false
	}
	d.acquires[name]++
	return true
}

// end notes that an AcquireLease of name is done; true if name left
// meanwhile.
func (d *departures) end(name string) bool {
	if d.acquires[name]--; d.acquires[name] <= 0 {
		delete(d.acquires, name)
	}
	_, gone := d.at[name]
	return gone
}

// caller is what the bus said of one connection.
type caller struct {
	uid     uint32
	gids    []uint32 // its groups, as the bus says
	allowed bool
	err     string // why the bus could not say
}

// authorize lets root and members of the admin group change pools. A
// connection's credentials are asked of the bus once.
func (s *Server) authorize(sender dbus.Sender, method string) *dbus.Error {
	s.mu.Lock()
	c, ok := s.callers[string(sender)]
	s.mu.Unlock()
	if !ok {
		c = s.credentials(sender)
		s.mu.Lock()
		if _, gone := s.left.at[string(sender)]; !gone {
			s.callers[string(sender)] = c
		}
		s.mu.Unlock()
	}
	switch {
	case c.err != "":
		return dbus.NewError("org.freedesktop.DBus.Error.AccessDenied", []any{c.err})
	case c.allowed:
		return nil
	}
	s.rejected(rejectDenied, fmt.Sprintf("access denied: %s by uid %d", method, c.uid), journal.CallerUID, c.uid, journal.Method, method, journal.Sender, string(sender))
	return dbus.NewError("org.freedesktop.DBus.Error.AccessDenied",
		[]any{fmt.Sprintf("%s is for root and the admin group; uid %d is neither", method, c.uid)})
}

// credentials asks the bus who a connection is.
func (s *Server) credentials(sender dbus.Sender) caller {
	var creds map[string]dbus.Variant
	err := s.conn.BusObject().Call("org.freedesktop.DBus.GetConnectionCredentials", 0, string(sender)).Store(&creds)
	if err != nil {
		return caller{err: safetext.Bound("cannot tell who is calling: " + err.Error())}
	}
	uid, ok := creds["UnixUserID"].Value().(uint32)
	if !ok {
		return caller{err: "the bus did not say who is calling"}
	}
	c := caller{uid: uid, allowed: uid == 0}
	if gids, ok := creds["UnixGroupIDs"].Value().([]uint32); ok {
		c.gids = gids
		if s.adminGID >= 0 && slices.Contains(gids, uint32(s.adminGID)) {
			c.allowed = true
		}
	}
	return c
}

// callerContext is the server's context carrying the caller of an
// authorized call, unless it is root: a model it names must be one it
// could read itself (the admin group is not root).
func (s *Server) callerContext(sender dbus.Sender) context.Context {
	s.mu.Lock()
	c, ok := s.callers[string(sender)]
	s.mu.Unlock()
	if !ok {
		c = s.credentials(sender)
	}
	if c.err == "" && c.uid == 0 {
		return s.ctx
	}
	u := model.User{UID: c.uid, Groups: c.gids, Role: "the caller"}
	if c.err != "" {
		// Nobody's rights: what every user may read, no more.
		u = model.User{UID: ^uint32(0), GID: ^uint32(0), Role: "the caller"}
	} else if len(c.gids) > 0 {
		u.GID = c.gids[0]
	} else {
		u.GID = ^uint32(0)
	}
	return model.WithCaller(s.ctx, u)
}

// managerObject is the exported Manager interface.
type managerObject struct{ s *Server }

// PoolRef is one ListPools entry.
type PoolRef struct {
	ID   string
	Path dbus.ObjectPath
}

func (m *managerObject) ListPools() ([]PoolRef, *dbus.Error) {
	var out []PoolRef
	for _, id := range m.s.mgr.IDs() {
		out = append(out, PoolRef{safetext.Bound(id), shipped.PoolPath(id)})
	}
	return out, nil
}

func (m *managerObject) Drain(sender dbus.Sender, pool string, deadlineMS uint64) (string, *dbus.Error) {
	if err := m.check(sender, "Drain", pool); err != nil {
		return "", err
	}
	if err := checkDeadline(deadlineMS); err != nil {
		return "", err
	}
	res, err := m.s.mgr.Drain(m.s.ctx, pool, time.Duration(deadlineMS)*time.Millisecond)
	if err != nil {
		return "", toDBus(err)
	}
	return res.Outcome, nil
}

func (m *managerObject) Reload(sender dbus.Sender, pool, ref string, deadlineMS uint64) (string, *dbus.Error) {
	if err := m.check(sender, "Reload", pool); err != nil {
		return "", err
	}
	if err := checkRef(ref); err != nil {
		return "", err
	}
	if err := checkDeadline(deadlineMS); err != nil {
		return "", err
	}
	name, err := m.s.mgr.Reload(m.s.callerContext(sender), pool, ref, time.Duration(deadlineMS)*time.Millisecond)
	return safetext.Bound(name), toDBus(err)
}

// ReloadEx is Reload with options: runtime (b) keeps the model for the
// boot only.
func (m *managerObject) ReloadEx(sender dbus.Sender, pool, ref string, deadlineMS uint64, options map[string]dbus.Variant) (string, *dbus.Error) {
	if err := m.check(sender, "ReloadEx", pool); err != nil {
		return "", err
	}
	if err := checkRef(ref); err != nil {
		return "", err
	}
	if err := checkDeadline(deadlineMS); err != nil {
		return "", err
	}
	runtime := false
	for k, v := range options {
		switch k {
		case "runtime":
			b, ok := v.Value().(bool)
			if !ok {
				return "", invalid(fmt.Sprintf("option runtime: must be b (a boolean), not %s", v.Signature()))
			}
			runtime = b
		default:
			return "", invalid(fmt.Sprintf("unknown option %q (known: runtime)", safetext.Bound(k)))
		}
	}
	model, err := m.s.mgr.ReloadModel(m.s.ctx, pool, ref, time.Duration(deadlineMS)*time.Millisecond, runtime)
	return safetext.Bound(model), toDBus(err)
}

// ReloadConfig re-reads the configuration and answers once it is applied,
// with the settings that wait for a daemon restart; a refused one is
// InvalidArgument with the reasons. systemctl reload runs it.
func (m *managerObject) ReloadConfig(sender dbus.Sender) ([]string, *dbus.Error) {
	if err := m.s.authorize(sender, "ReloadConfig"); err != nil {
		return nil, err
	}
	m.s.mu.Lock()
	notify := m.s.notify
	m.s.mu.Unlock()
	if notify != nil {
		defer notify()()
	}
	warnings, err := m.s.mgr.ReloadConfig()
	if err != nil {
		return nil, toDBus(err)
	}
	out := []string{}
	for _, w := range warnings {
		out = append(out, safetext.Bound(w))
	}
	return out, nil
}

func (m *managerObject) Enable(sender dbus.Sender, pool string, runtime bool) *dbus.Error {
	if err := m.check(sender, "Enable", pool); err != nil {
		return err
	}
	return toDBus(m.s.mgr.SetAutoStart(pool, true, runtime))
}

func (m *managerObject) Disable(sender dbus.Sender, pool string, runtime bool) *dbus.Error {
	if err := m.check(sender, "Disable", pool); err != nil {
		return err
	}
	return toDBus(m.s.mgr.SetAutoStart(pool, false, runtime))
}

func (m *managerObject) Start(sender dbus.Sender, pool string) *dbus.Error {
	if err := m.check(sender, "Start", pool); err != nil {
		return err
	}
	return toDBus(m.s.mgr.Start(pool))
}

func (m *managerObject) Stop(sender dbus.Sender, pool string) *dbus.Error {
	if err := m.check(sender, "Stop", pool); err != nil {
		return err
	}
	return toDBus(m.s.mgr.Stop(m.s.ctx, pool))
}

// EnsureReady answers once the pool is Ready, starting it where it can;
// like Drain it blocks only its own call.
func (m *managerObject) EnsureReady(sender dbus.Sender, pool string, timeoutMS uint64) *dbus.Error {
	if err := m.check(sender, "EnsureReady", pool); err != nil {
		return err
	}
	if timeoutMS > uint64(lifecycle.MaxWakeTimeout/time.Millisecond) {
		return invalid(fmt.Sprintf("timeout_ms %d is more than %d (one hour)", timeoutMS, lifecycle.MaxWakeTimeout/time.Millisecond))
	}
	return toDBus(m.s.mgr.EnsureReady(m.s.ctx, pool, time.Duration(timeoutMS)*time.Millisecond))
}

func (m *managerObject) AcquireLease(sender dbus.Sender, pool string) (string, *dbus.Error) {
	if err := m.check(sender, "AcquireLease", pool); err != nil {
		return "", err
	}
	s, owner := m.s, string(sender)
	if s.hooks.acquired != nil {
		defer s.hooks.acquired(owner)
	}
	s.mu.Lock()
	here := s.left.begin(owner)
	s.mu.Unlock()
	if !here {
		return "", errCallerGone(owner)
	}
	if s.hooks.acquiring != nil {
		s.hooks.acquiring(owner)
	}
	id, err := s.mgr.AcquireLease(pool, owner)
	// Checked after the add: a departure noted before this point may have
	// released the caller's leases before this one was there; one noted
	// after it releases this one too.
	s.mu.Lock()
	gone := s.left.end(owner)
	s.mu.Unlock()
	if gone && err == nil {
		if err := s.mgr.ReleaseLeaseAs(id, owner); err != nil && !errors.Is(err, lifecycle.ErrNoSuchLease) {
			s.log.Error("cannot undo the lease of a caller that left the bus", journal.Lease, id, journal.Sender, owner, journal.Error, err.Error())
		}
		return "", errCallerGone(owner)
	}
	return id, toDBus(err)
}

func errCallerGone(owner string) *dbus.Error {
	return dbus.MakeFailedError(fmt.Errorf("%s left the bus: a lease is not kept for a connection that is gone", owner))
}

func (m *managerObject) ReleaseLease(sender dbus.Sender, id string) *dbus.Error {
	if err := m.s.authorize(sender, "ReleaseLease"); err != nil {
		return err
	}
	if len(id) > 256 {
		return invalid("lease id too long")
	}
	return toDBus(m.s.mgr.ReleaseLeaseAs(id, string(sender)))
}

func (m *managerObject) ResetBreaker(sender dbus.Sender, pool string) *dbus.Error {
	if err := m.check(sender, "ResetBreaker", pool); err != nil {
		return err
	}
	return toDBus(m.s.mgr.ResetBreaker(pool))
}

func (m *managerObject) AllowRestart(sender dbus.Sender, pool string) *dbus.Error {
	if err := m.check(sender, "AllowRestart", pool); err != nil {
		return err
	}
	return toDBus(m.s.mgr.AllowRestart(pool))
}

// check authorizes a mutating call and validates its pool argument.
func (m *managerObject) check(sender dbus.Sender, method, pool string) *dbus.Error {
	if err := m.s.authorize(sender, method); err != nil {
		return err
	}
	return checkPoolID(pool)
}
