package bus

import (
	"errors"

	"github.com/godbus/dbus/v5"

	api "github.com/llorch/pool-managerd/dbus"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/manager"
	"github.com/llorch/pool-managerd/internal/safetext"
)

// errorNames maps the core's refusals to the D-Bus error names scripts
// match on.
var errorNames = []struct {
	err  error
	name string
}{
	{manager.ErrNoSuchPool, api.ErrNoSuchPool},
	{lifecycle.ErrInvalidArgument, api.ErrInvalidArgument},
	{lifecycle.ErrNotReady, api.ErrNotReady},
	{lifecycle.ErrDraining, api.ErrDraining},
	{lifecycle.ErrBusy, api.ErrBusy},
	{lifecycle.ErrNoCapacity, api.ErrNoCapacity},
	{lifecycle.ErrNoSuchLease, api.ErrNoSuchLease},
	{lifecycle.ErrNotOwner, api.ErrNoSuchLease},
	{lifecycle.ErrDrainTimeout, api.ErrDrainTimeout},
	{lifecycle.ErrReloadFailed, api.ErrReloadFailed},
	{lifecycle.ErrBreakerOpen, api.ErrBreakerOpen},
	{lifecycle.ErrGPUUnhealthy, api.ErrGPUUnhealthy},
	{lifecycle.ErrGPUBusy, api.ErrGPUBusy},
	{lifecycle.ErrNoGPUMemory, api.ErrNoGPUMemory},
	{lifecycle.ErrNoRestartPending, api.ErrNoRestartPending},
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
			return dbus.NewError(e.name, []any{msg})
		}
	}
	return dbus.NewError("org.freedesktop.DBus.Error.Failed", []any{msg})
}
