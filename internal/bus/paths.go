package bus

import (
	"fmt"
	"unicode/utf8"

	"github.com/godbus/dbus/v5"

	api "github.com/llorch/pool-managerd/dbus"
)

// Names on the bus.
const (
	Name         = api.BusName
	ManagerPath  = dbus.ObjectPath(api.ManagerPath)
	PoolPrefix   = api.PoolPathPrefix
	ManagerIface = api.ManagerInterface
	PoolIface    = api.PoolInterface
	ErrorPrefix  = api.ErrorPrefix
)

// MaxDeadline bounds Drain and Reload deadlines: past a day is a mistake.
const MaxDeadline = 24 * 60 * 60 * 1000 // ms

// checkPoolID refuses what no pool id can be, before any lookup.
func checkPoolID(id string) *dbus.Error {
	switch {
	case id == "":
		return invalid("empty pool id")
	case len(id) > 64:
		return invalid(fmt.Sprintf("pool id of %d bytes: ids are at most 64", len(id)))
	case !utf8.ValidString(id):
		return invalid("pool id is not UTF-8")
	}
	return nil
}

// MaxRef bounds a Reload's model ref: PATH_MAX, the longest path the
// kernel takes, and longer than any ref a registry names.
const MaxRef = 4096

func checkRef(ref string) *dbus.Error {
	if len(ref) > MaxRef {
		return invalid(fmt.Sprintf("model ref of %d bytes: refs are at most %d (PATH_MAX)", len(ref), MaxRef))
	}
	return nil
}

func checkDeadline(ms uint64) *dbus.Error {
	if ms > MaxDeadline {
		return invalid(fmt.Sprintf("deadline of %d ms is more than a day (%d ms)", ms, MaxDeadline))
	}
	return nil
}

func invalid(msg string) *dbus.Error {
	return dbus.NewError(api.ErrInvalidArgument, []any{msg})
}
