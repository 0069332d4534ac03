package dbus

import (
	"encoding/hex"
	"strings"

	godbus "github.com/godbus/dbus/v5"
)

// Names of the API on the bus, shared by the daemon and its clients.
const (
	BusName          = "org.llorch.PoolManager1"
	ManagerPath      = "/org/llorch/PoolManager1"
	PoolPathPrefix   = "/org/llorch/PoolManager1/pool"
	ManagerInterface = "org.llorch.PoolManager1.Manager"
	PoolInterface    = "org.llorch.PoolManager1.Pool"
	ErrorPrefix      = "org.llorch.PoolManager1.Error."
)

// The errors the daemon answers with, which scripts match on.
const (
	ErrNoSuchPool       = ErrorPrefix + "NoSuchPool"
	ErrInvalidArgument  = ErrorPrefix + "InvalidArgument"
	ErrNotReady         = ErrorPrefix + "NotReady"
	ErrDraining         = ErrorPrefix + "Draining"
	ErrBusy             = ErrorPrefix + "Busy"
	ErrNoCapacity       = ErrorPrefix + "NoCapacity"
	ErrNoSuchLease      = ErrorPrefix + "NoSuchLease"
	ErrDrainTimeout     = ErrorPrefix + "DrainTimeout"
	ErrReloadFailed     = ErrorPrefix + "ReloadFailed"
	ErrBreakerOpen      = ErrorPrefix + "BreakerOpen"
	ErrGPUUnhealthy     = ErrorPrefix + "GPUUnhealthy"
	ErrGPUBusy          = ErrorPrefix + "GPUBusy"
	ErrNoGPUMemory      = ErrorPrefix + "NoGPUMemory"
	ErrNoRestartPending = ErrorPrefix + "NoRestartPending"
)

// PathEncode escapes s into one object path element as systemd's
// sd_bus_path_encode does (bus_label_escape): ASCII letters stay, and
// digits except a leading one; every other byte is _xx in lower-case hex;
// the empty string is "_". systemd names its units' objects so, and the
// daemon its pools'.
func PathEncode(s string) string {
	if s == "" {
		return "_"
	}
	const digits = "0123456789abcdef"
	b := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		alpha := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'
		if alpha || i > 0 && c >= '0' && c <= '9' {
			b = append(b, c)
			continue
		}
		b = append(b, '_', digits[c>>4], digits[c&15])
	}
	return string(b)
}

// PathDecode is sd_bus_path_decode: the element of path just below
// prefix, unescaped. Unlike systemd, which takes a broken escape as it
// is, it refuses one, and a path that is not exactly one element below
// prefix.
func PathDecode(path, prefix string) (string, bool) {
	elem, ok := strings.CutPrefix(path, prefix+"/")
	if !ok || elem == "" || strings.Contains(elem, "/") {
		return "", false
	}
	if elem == "_" {
		return "", true
	}
	b := make([]byte, 0, len(elem))
	for i := 0; i < len(elem); i++ {
		if elem[i] != '_' {
			b = append(b, elem[i])
			continue
		}
		if i+2 >= len(elem) {
			return "", false
		}
		v, err := hex.DecodeString(elem[i+1 : i+3])
		if err != nil {
			return "", false
		}
		b = append(b, v[0])
		i += 2
	}
	return string(b), true
}

// PoolPath is the object path of a pool.
func PoolPath(id string) godbus.ObjectPath {
	return godbus.ObjectPath(PoolPathPrefix + "/" + PathEncode(id))
}

// PoolID is the id of the pool whose object path is path.
func PoolID(path godbus.ObjectPath) (string, bool) { return PathDecode(string(path), PoolPathPrefix) }
