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
// device on it, one for a GPU instance only that instance.
func WatchXID(ctx context.Context, lib NVML, uuids []string, fn func(uuid string, xid uint64)) error {
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
