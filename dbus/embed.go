// Package dbus holds the D-Bus files pool-managerd ships: its introspection
// data (served as is by the daemon, so the two cannot differ) and its bus
// policy. There is no activation file: a call never starts the daemon.
package dbus

import _ "embed"

// Manager and Pool are the introspection data of the two interfaces.
var (
	//go:embed org.llorch.PoolManager1.Manager.xml
	Manager string
	//go:embed org.llorch.PoolManager1.Pool.xml
	Pool string
)
