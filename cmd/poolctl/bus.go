package main

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/godbus/dbus/v5/introspect"

	ifaces "github.com/llorch/pool-managerd/dbus"
	"github.com/llorch/pool-managerd/internal/safetext"
)

// Names of the daemon's API (dbus/*.xml).
const (
	busName      = ifaces.BusName
	managerPath  = dbus.ObjectPath(ifaces.ManagerPath)
	poolPrefix   = ifaces.PoolPathPrefix
	managerIface = ifaces.ManagerInterface
	poolIface    = ifaces.PoolInterface
	accessDenied = "org.freedesktop.DBus.Error.AccessDenied"
	propsChanged = "org.freedesktop.DBus.Properties.PropertiesChanged"
	busDriver    = "org.freedesktop.DBus"
)

// readTimeout bounds calls that answer at once; changeTimeout those that
// wait for an engine to stop or start.
const (
	readTimeout   = 25 * time.Second
	changeTimeout = 10 * time.Minute
)

var errInterrupted = errors.New("interrupted")

// notRunning is what a call to the daemon while it is down says.
const notRunning = "pool-managerd is not running (systemctl start pool-managerd)"

func (c *cli) bus() (*dbus.Conn, error) {
	if c.conn != nil {
		return c.conn, nil
	}
	var conn *dbus.Conn
	var err error
	where := "the system bus"
	switch {
	case c.host != "":
		where = "the system bus of " + c.host
		conn, err = dialHost(c.host, c.stderr)
	case c.busAddr != "":
		where = c.busAddr
		conn, err = dbus.Connect(c.busAddr)
	default:
		conn, err = dbus.ConnectSystemBus()
	}
	if err != nil {
		return nil, fmt.Errorf("cannot connect to %s: %w", where, err)
	}
	c.conn = conn
	return conn, nil
}

// disconnect closes the bus connection, if any (and the ssh under it).
func (c *cli) disconnect() {
	if c.conn != nil {
		c.conn.Close()
		c.conn = nil
	}
}

func (c *cli) callManager(timeout time.Duration, method string, args ...any) *dbus.Call {
	conn, err := c.bus()
	if err != nil {
		return &dbus.Call{Err: err}
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return conn.Object(busName, managerPath).CallWithContext(ctx, managerIface+"."+method, 0, args...)
}

// poolRef is one ListPools entry.
type poolRef struct {
	ID   string
	Path dbus.ObjectPath
}

func (c *cli) listPools() ([]poolRef, error) {
	var refs []poolRef
	if err := c.callManager(readTimeout, "ListPools").Store(&refs); err != nil {
		return nil, err
	}
	return refs, nil
}

// props reads every property of a pool; a pool the daemon does not have is
// its NoSuchPool error, as the methods answer.
func (c *cli) props(id string) (map[string]dbus.Variant, error) {
	conn, err := c.bus()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), readTimeout)
	defer cancel()
	var all map[string]dbus.Variant
	err = conn.Object(busName, ifaces.PoolPath(id)).CallWithContext(ctx, "org.freedesktop.DBus.Properties.GetAll", 0, poolIface).Store(&all)
	var de dbus.Error
	if errors.As(err, &de) && (de.Name == "org.freedesktop.DBus.Error.UnknownObject" || de.Name == "org.freedesktop.DBus.Error.UnknownInterface" || de.Name == "org.freedesktop.DBus.Error.UnknownMethod") {
		return nil, dbus.Error{Name: ifaces.ErrNoSuchPool, Body: []any{fmt.Sprintf("no pool %q", id)}}
	}
	return all, err
}

// propertyNames are the Pool interface's properties in the order the
// interface declares them.
var propertyNames = sync.OnceValue(func() []string {
	var node introspect.Node
	if err := xml.Unmarshal([]byte(ifaces.Pool), &node); err != nil {
		panic("the embedded Pool interface does not parse: " + err.Error())
	}
	var names []string
	for _, i := range node.Interfaces {
		for _, p := range i.Properties {
			names = append(names, p.Name)
		}
	}
	return names
})

// ordered lists the names of m: the interface's first, in its order, then
// any the daemon has that this poolctl does not know, sorted.
func ordered(m map[string]dbus.Variant) []string {
	var out []string
	known := map[string]bool{}
	for _, n := range propertyNames() {
		known[n] = true
		if _, ok := m[n]; ok {
			out = append(out, n)
		}
	}
	var extra []string
	for n := range m {
		if !known[n] {
			extra = append(extra, n)
		}
	}
	slices.Sort(extra)
	return append(out, extra...)
}

// failure is the line poolctl ends with on an error: the daemon's message
// may quote an engine (a start's LastError), which must not start lines of
// its own.
func failure(err error) string {
	return safetext.Line(describe(err))
}

// dbusError is err's D-Bus error, if it is one.
func dbusError(err error) (dbus.Error, bool) {
	var de dbus.Error
	var dep *dbus.Error
	switch {
	case errors.As(err, &de):
		return de, true
	case errors.As(err, &dep) && dep != nil:
		return *dep, true
	}
	return dbus.Error{}, false
}

// errorName is err's D-Bus error name, "" for another error.
func errorName(err error) string {
	de, _ := dbusError(err)
	return de.Name
}

// unknownMethod: a daemon older than this poolctl.
const unknownMethod = "org.freedesktop.DBus.Error.UnknownMethod"

// describe is an error as a person and a script read it: the D-Bus error
// name first.
func describe(err error) string {
	de, ok := dbusError(err)
	if !ok {
		return err.Error()
	}
	msg := ""
	if len(de.Body) > 0 {
		if s, ok := de.Body[0].(string); ok {
			msg = s
		}
	}
	switch de.Name {
	case "org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner":
		// Nothing starts the daemon on a call (no bus activation).
		msg = notRunning
	}
	if de.Name == accessDenied {
		const who = "changing pools is for root and the pool-managerd admin group (pool-admin unless AdminGroup= says otherwise)"
		if strings.HasPrefix(msg, "Rejected send message") {
			// The bus's own words list every header of the call.
			msg = fmt.Sprintf("the bus refused uid %d: %s", os.Getuid(), who)
		} else {
			msg = strings.TrimSuffix(msg, ".") + "; " + who
		}
	}
	if de.Name == unknownMethod {
		msg = strings.TrimSuffix(msg, ".") + "; pool-managerd is older than this poolctl"
	}
	if msg == "" {
		return de.Name
	}
	return de.Name + ": " + msg
}

// owner follows which connection owns the daemon's name: only its signals
// are the daemon's (anyone may send a PropertiesChanged to us).
type owner struct {
	mu   sync.Mutex
	name string
}

func (o *owner) get() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.name
}

func (o *owner) set(n string) {
	o.mu.Lock()
	o.name = n
	o.mu.Unlock()
}

// watch subscribes to the pools' PropertiesChanged (of one pool, or of all
// with path ""), and to the daemon's name changing hands; it returns the
// channel and the current owner.
func (c *cli) watch(path dbus.ObjectPath) (chan *dbus.Signal, *owner, error) {
	conn, err := c.bus()
	if err != nil {
		return nil, nil, err
	}
	where := dbus.WithMatchPathNamespace(poolPrefix)
	if path != "" {
		where = dbus.WithMatchObjectPath(path)
	}
	if err := conn.AddMatchSignal(dbus.WithMatchSender(busName), where,
		dbus.WithMatchInterface("org.freedesktop.DBus.Properties"), dbus.WithMatchMember("PropertiesChanged")); err != nil {
		return nil, nil, fmt.Errorf("cannot follow the pools' changes: %w", err)
	}
	if err := conn.AddMatchSignal(dbus.WithMatchSender(busDriver), dbus.WithMatchInterface(busDriver),
		dbus.WithMatchMember("NameOwnerChanged"), dbus.WithMatchArg(0, busName)); err != nil {
		return nil, nil, fmt.Errorf("cannot follow the daemon on the bus: %w", err)
	}
	sigs := make(chan *dbus.Signal, 256)
	conn.Signal(sigs)
	o := &owner{}
	var name string
	if err := conn.BusObject().Call(busDriver+".GetNameOwner", 0, busName).Store(&name); err == nil {
		o.set(name)
	}
	return sigs, o, nil
}

// change is one PropertiesChanged of a pool from the daemon.
type change struct {
	Pool    string
	Changed map[string]dbus.Variant
}

// ownerChange is the daemon's name changing hands: new is "" when it left.
type ownerChange struct{ new string }

// classify reads one signal: a pool's change, the daemon's name changing
// hands, or nothing to show (another sender, another interface).
func classify(s *dbus.Signal, o *owner) any {
	switch {
	case s.Name == busDriver+".NameOwnerChanged" && s.Sender == busDriver && len(s.Body) == 3:
		if n, _ := s.Body[0].(string); n == busName {
			now, _ := s.Body[2].(string)
			o.set(now)
			return ownerChange{now}
		}
	case s.Name == propsChanged && s.Sender != "" && s.Sender == o.get() && len(s.Body) >= 2:
		if iface, _ := s.Body[0].(string); iface != poolIface {
			return nil
		}
		changed, ok := s.Body[1].(map[string]dbus.Variant)
		id, okID := ifaces.PoolID(s.Path)
		if ok && okID {
			return change{Pool: id, Changed: changed}
		}
	}
	return nil
}
