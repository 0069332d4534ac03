// Package bus is pool-managerd's D-Bus surface, org.llorch.PoolManager1: a
// thin layer over the manager that checks arguments and callers, ties
// leases to the caller's connection, and publishes each pool's state as
// properties with PropertiesChanged.
package bus

import (
	"context"
	"encoding/xml"
	"fmt"
	"log/slog"
	"os/user"
	"reflect"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/godbus/dbus/v5/introspect"
	"github.com/godbus/dbus/v5/prop"

	shipped "github.com/llorch/pool-managerd/dbus"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/manager"
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
}

// Serve exports the manager and its pools on conn, watches for callers
// leaving the bus, and then takes the bus name: a caller never finds the
// name without the objects. It runs until ctx ends.
func Serve(ctx context.Context, conn *dbus.Conn, mgr *manager.Manager, log *slog.Logger, adminGroup string) (*Server, error) {
	s := &Server{conn: conn, mgr: mgr, log: log, ctx: ctx, adminGID: -1, pools: map[string]context.CancelFunc{}, callers: map[string]caller{}}
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

// properties projects a snapshot onto the Pool interface's properties.
func properties(s supervisor.Snapshot) map[string]any {
	var next uint64
	if !s.NextRestart.IsZero() {
		next = uint64(s.NextRestart.UnixMicro())
	}
	return map[string]any{
		"Id": s.ID, "State": s.State, "Live": s.Live, "Ready": s.Ready, "Draining": s.Draining,
		"ActiveLeases": s.ActiveLeases, "Slots": s.Slots, "Model": s.Model, "ModelDigest": s.ModelDigest,
		"EngineVersion": s.EngineVersion, "DeviceMask": s.DeviceMask, "LastError": s.LastError,
		"CrashCount": uint32(s.CrashCount), "RestartCount": uint32(s.RestartCount), "BreakerState": s.BreakerState,
		"NextRestartUSec": next, "Unit": s.Unit, "MainPID": uint32(s.MainPID),
	}
}

func (s *Server) exportPoolList() error {
	var ids []string
	for _, id := range s.mgr.IDs() {
		ids = append(ids, PathEncode(id))
	}
	return exportIntrospection(s.conn, PoolPrefix, "", ids, false)
}

// PutPool publishes a pool added by a configuration reload, or the new
// supervisor of a pool whose configuration changed.
func (s *Server) PutPool(p *supervisor.Supervisor) error {
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
	path := PoolPath(id)
	s.conn.Export(nil, path, "org.freedesktop.DBus.Properties")
	s.conn.Export(nil, path, "org.freedesktop.DBus.Introspectable")
	s.exportPoolList()
}

func (s *Server) exportPool(p *supervisor.Supervisor) error {
	snap := p.Snapshot()
	path := PoolPath(snap.ID)
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
// PropertiesChanged per change with every property that changed.
func (s *Server) publish(ctx context.Context, p *supervisor.Supervisor, path dbus.ObjectPath, props *prop.Properties, last map[string]any) {
	for {
		snap, err := p.Wait(ctx, func(snap supervisor.Snapshot) bool { return !reflect.DeepEqual(properties(snap), last) })
		if err != nil {
			return
		}
		cur := properties(snap)
		changed := map[string]dbus.Variant{}
		for k, v := range cur {
			if !reflect.DeepEqual(v, last[k]) {
				props.SetMust(PoolIface, k, v)
				changed[k] = dbus.MakeVariant(v)
			}
		}
		s.conn.Emit(path, "org.freedesktop.DBus.Properties.PropertiesChanged", PoolIface, changed, []string{})
		last = cur
	}
}

// watchCallers releases a connection's leases when it leaves the bus.
func (s *Server) watchCallers() error {
	if err := s.conn.AddMatchSignal(
		dbus.WithMatchInterface("org.freedesktop.DBus"),
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
			case sig := <-ch:
				if sig == nil || sig.Name != "org.freedesktop.DBus.NameOwnerChanged" || len(sig.Body) != 3 {
					continue
				}
				name, _ := sig.Body[0].(string)
				newOwner, _ := sig.Body[2].(string)
				if newOwner == "" && len(name) > 0 && name[0] == ':' {
					s.mu.Lock()
					delete(s.callers, name)
					s.mu.Unlock()
					if n := s.mgr.ReleaseOwner(name); n > 0 {
						s.log.Info(fmt.Sprintf("released %d lease(s) of %s: it left the bus", n, name), journal.ActiveLeases, n)
					}
				}
			}
		}
	}()
	return nil
}

// caller is what the bus said of one connection.
type caller struct {
	uid     uint32
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
		s.callers[string(sender)] = c
		s.mu.Unlock()
	}
	switch {
	case c.err != "":
		return dbus.NewError("org.freedesktop.DBus.Error.AccessDenied", []any{c.err})
	case c.allowed:
		return nil
	}
	s.log.Warn(fmt.Sprintf("access denied: %s by uid %d", method, c.uid), "CALLER_UID", c.uid, "METHOD", method, "SENDER", string(sender))
	return dbus.NewError("org.freedesktop.DBus.Error.AccessDenied",
		[]any{fmt.Sprintf("%s is for root and the admin group; uid %d is neither", method, c.uid)})
}

// credentials asks the bus who a connection is.
func (s *Server) credentials(sender dbus.Sender) caller {
	var creds map[string]dbus.Variant
	err := s.conn.BusObject().Call("org.freedesktop.DBus.GetConnectionCredentials", 0, string(sender)).Store(&creds)
	if err != nil {
		return caller{err: "cannot tell who is calling: " + err.Error()}
	}
	uid, ok := creds["UnixUserID"].Value().(uint32)
	if !ok {
		return caller{err: "the bus did not say who is calling"}
	}
	c := caller{uid: uid, allowed: uid == 0}
	if gids, ok := creds["UnixGroupIDs"].Value().([]uint32); ok && s.adminGID >= 0 && slices.Contains(gids, uint32(s.adminGID)) {
		c.allowed = true
	}
	return c
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
		out = append(out, PoolRef{id, PoolPath(id)})
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
	if err := checkDeadline(deadlineMS); err != nil {
		return "", err
	}
	model, err := m.s.mgr.Reload(m.s.ctx, pool, ref, time.Duration(deadlineMS)*time.Millisecond)
	return model, toDBus(err)
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

func (m *managerObject) AcquireLease(sender dbus.Sender, pool string) (string, *dbus.Error) {
	if err := m.check(sender, "AcquireLease", pool); err != nil {
		return "", err
	}
	id, err := m.s.mgr.AcquireLease(pool, string(sender))
	return id, toDBus(err)
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
