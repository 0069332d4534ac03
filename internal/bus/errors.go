package bus

import (
	"errors"

	"github.com/godbus/dbus/v5"

	api "github.com/llorch/pool-managerd/dbus"
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
	{manager.ErrNoSuchPool, api.ErrNoSuchPool},
	{supervisor.ErrInvalidArgument, api.ErrInvalidArgument},
	{supervisor.ErrNotReady, api.ErrNotReady},
	{supervisor.ErrDraining, api.ErrDraining},
	{supervisor.ErrBusy, api.ErrBusy},
	{supervisor.ErrNoCapacity, api.ErrNoCapacity},
	{supervisor.ErrNoSuchLease, api.ErrNoSuchLease},
	{supervisor.ErrNotOwner, api.ErrNoSuchLease},
	{supervisor.ErrDrainTimeout, api.ErrDrainTimeout},
	{supervisor.ErrReloadFailed, api.ErrReloadFailed},
	{supervisor.ErrBreakerOpen, api.ErrBreakerOpen},
	{supervisor.ErrGPUUnhealthy, api.ErrGPUUnhealthy},
	{supervisor.ErrNoRestartPending, api.ErrNoRestartPending},
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
