package main

import (
	"context"
	"time"

	"github.com/godbus/dbus/v5"
)

// maxEnsureWait is the longest wait EnsureReady takes (its timeout_ms);
// more is refused here rather than by the daemon.
const maxEnsureWait = time.Hour

// ensureReady asks the daemon to make the pool Ready, starting it if it is
// idle, and follows it until the daemon answers.
func (c *cli) ensureReady(args []string) error {
	id := args[0]
	// The daemon's own wait, then the usual margin for its answer.
	c.deadline = c.timeout
	return c.follow("ensure-ready", id, func(ctx context.Context, obj dbus.BusObject) (string, error) {
		return "ready", obj.CallWithContext(ctx, managerIface+".EnsureReady", 0, id, uint64(c.timeout.Milliseconds())).Err
	})
}

// idleFor is how an idle or sleeping pool's state reads: since when and
// how long ago (IdleSinceUSec); any other state as it is.
func idleFor(m map[string]dbus.Variant, now time.Time, long bool) string {
	state := value[string](m, "State")
	since := value[uint64](m, "IdleSinceUSec")
	if state != "idle" && state != "sleeping" || since == 0 {
		return state
	}
	at := time.UnixMicro(int64(since))
	ago := "0s"
	if d := now.Sub(at).Truncate(time.Second); d > 0 {
		ago = span(d)
	}
	if !long {
		return state + " (" + ago + ")"
	}
	return state + " since " + at.Format("Mon 2006-01-02 15:04:05 MST") + " (" + ago + " ago)"
}
