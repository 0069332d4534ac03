package bus

import (
	"fmt"
	"strings"
	"unicode/utf8"

	"github.com/godbus/dbus/v5"
)

// Names on the bus.
const (
	Name         = "org.llorch.PoolManager1"
	ManagerPath  = dbus.ObjectPath("/org/llorch/PoolManager1")
	PoolPrefix   = "/org/llorch/PoolManager1/pool"
	ManagerIface = "org.llorch.PoolManager1.Manager"
	PoolIface    = "org.llorch.PoolManager1.Pool"
	ErrorPrefix  = "org.llorch.PoolManager1.Error."
)

// PathEncode escapes s into one object path element the way systemd's
// sd_bus_path_encode does: [A-Za-z0-9] stay, every other byte is _xx
// (lower-case hex), and the empty string is "_".
func PathEncode(s string) string {
	if s == "" {
		return "_"
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "_%02x", c)
		}
	}
	return b.String()
}

// PathDecode reverses PathEncode.
func PathDecode(e string) (string, error) {
	if e == "_" {
		return "", nil
	}
	var b strings.Builder
	for i := 0; i < len(e); i++ {
		c := e[i]
		if c != '_' {
			b.WriteByte(c)
			continue
		}
		if i+2 >= len(e) {
			return "", fmt.Errorf("bad escape in %q", e)
		}
		var v byte
		if _, err := fmt.Sscanf(e[i+1:i+3], "%02x", &v); err != nil {
			return "", fmt.Errorf("bad escape in %q", e)
		}
		b.WriteByte(v)
		i += 2
	}
	return b.String(), nil
}

// PoolPath is the object path of a pool.
func PoolPath(id string) dbus.ObjectPath {
	return dbus.ObjectPath(PoolPrefix + "/" + PathEncode(id))
}

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

func checkDeadline(ms uint64) *dbus.Error {
	if ms > MaxDeadline {
		return invalid(fmt.Sprintf("deadline of %d ms is more than a day (%d ms)", ms, MaxDeadline))
	}
	return nil
}

func invalid(msg string) *dbus.Error {
	return dbus.NewError(ErrorPrefix+"InvalidArgument", []any{msg})
}
