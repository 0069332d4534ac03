package bus

import (
	"errors"

	"github.com/godbus/dbus/v5"

	"github.com/llorch/pool-managerd/internal/manager"
	"github.com/llorch/pool-managerd/internal/safetext"
	"github.com/llorch/pool-managerd/internal/supervisor"
)

// errorNames maps the core's refusals to the D-Bus error names scripts
// match on.
var errorNames = []struct {
	err  error
	name string
}{
	{manager.ErrNoSuchPool, "NoSuchPool"},
	{supervisor.ErrInvalidArgument, "InvalidArgument"},
	{supervisor.ErrNotReady, "NotReady"},
	{supervisor.ErrDraining, "Draining"},
	{supervisor.ErrBusy, "Busy"},
	{supervisor.ErrNoCapacity, "NoCapacity"},
	{supervisor.ErrNoSuchLease, "NoSuchLease"},
	{supervisor.ErrNotOwner, "NoSuchLease"},
	{supervisor.ErrDrainTimeout, "DrainTimeout"},
	{supervisor.ErrReloadFailed, "ReloadFailed"},
	{supervisor.ErrBreakerOpen, "BreakerOpen"},
}

// toDBus turns an error of the core into a D-Bus error with the message a
// person reads.
func toDBus(err error) *dbus.Error {
	if err == nil {
		return nil
	}
	// The message may quote an engine or a file name.
	msg := safetext.Bound(err.Error())
	for _, e := range errorNames {
		if errors.Is(err, e.err) {
			return dbus.NewError(ErrorPrefix+e.name, []any{msg})
		}
	}
	return dbus.NewError("org.freedesktop.DBus.Error.Failed", []any{msg})
}
