package gpu

import (
	"context"
	"fmt"
	"strings"
	"time"
)

// xidPoll bounds each NVML wait, so a cancelled context is noticed within it.
const xidPoll = time.Second

// WatchXID calls fn(uuid, xid) for each XID event on the GPUs or MIG devices
// named by uuids, until ctx is done (then it returns nil). It returns an
// error at once when NVML cannot watch them, and when NVML fails later; the
// caller decides whether to watch again. MIG devices are watched through
// their parent GPU: an event for the whole GPU reaches every watched MIG
// device on it, one for a GPU instance only that instance. A nil lib is
// the host's NVML.
func WatchXID(ctx context.Context, lib NVML, uuids []string, fn func(uuid string, xid uint64)) error {
	if lib == nil {
		lib = NewNVML()
	}
	if err := lib.Init(); err != nil {
		return err
	}
	defer lib.Shutdown()
	set, err := lib.NewEventSet()
	if err != nil {
		return err
	}
	defer set.Free()

	type target struct {
		uuid, gpu string // as asked; the (parent) GPU's UUID
		mig       bool
		gi, ci    int
	}
	var targets []target
	registered := map[string]bool{}
	for _, u := range uuids {
		d, err := lib.DeviceByUUID(u)
		if err != nil {
			return fmt.Errorf("XID events for %s: %w", u, err)
		}
		t := target{uuid: u}
		p, err := d.Parent()
		if err != nil {
			return fmt.Errorf("XID events for %s: %w", u, err)
		}
		if p != nil {
			t.mig = true
			if t.gi, t.ci, err = d.MIGInstance(); err != nil {
				return fmt.Errorf("XID events for %s: %w", u, err)
			}
			d = p
		}
		if t.gpu, err = d.UUID(); err != nil {
			return fmt.Errorf("XID events for %s: %w", u, err)
		}
		key := strings.ToLower(t.gpu)
		if !registered[key] {
			if err := set.RegisterXID(d); err != nil {
				return fmt.Errorf("XID events for %s: %w", u, err)
			}
			registered[key] = true
		}
		targets = append(targets, t)
	}

	for ctx.Err() == nil {
		ev, err := set.Wait(xidPoll)
		if err != nil {
			return fmt.Errorf("XID events: %w", err)
		}
		if ev == nil {
			continue
		}
		for _, t := range targets {
			if !strings.EqualFold(t.gpu, ev.UUID) {
				continue
			}
			if !t.mig || ev.GPUInstance == NoInstance ||
				int(ev.GPUInstance) == t.gi && (ev.ComputeInstance == NoInstance || int(ev.ComputeInstance) == t.ci) {
				fn(t.uuid, ev.XID)
			}
		}
	}
	return nil
}

// KeepWatchingXID watches for XID events on the GPUs uuids() names, for as
// long as ctx lasts: it starts over on the new set each time changed fires
// (a configuration reload), and when NVML fails, at once or later, it
// reports the error to failed and tries again after retry (or at the next
// change). A nil lib is the host's NVML.
func KeepWatchingXID(ctx context.Context, lib NVML, uuids func() []string, changed <-chan struct{}, retry time.Duration,
	fn func(uuid string, xid uint64), failed func(error)) {
	for {
		var done chan error
		wctx, cancel := context.WithCancel(ctx)
		if set := uuids(); len(set) > 0 {
			done = make(chan error, 1)
			go func() { done <- WatchXID(wctx, lib, set, fn) }()
		}
		var err error
		select {
		case <-ctx.Done():
		case <-changed:
		case err = <-done:
			done = nil
		}
		cancel()
		if done != nil {
			// NVML is shut down before it is initialised again.
			<-done
		}
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			failed(err)
			select {
			case <-ctx.Done():
				return
			case <-changed:
			case <-time.After(retry):
			}
		}
	}
}
