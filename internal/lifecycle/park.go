package lifecycle

import (
	"log/slog"
	"time"

	"github.com/llorch/pool-managerd/internal/journal"
)

// Pools that share GPUs (one [Pool] Group=) take turns: the manager parks
// the awake member before it starts the one asked for. A park is a drain
// (leases honoured up to its deadline, the engine's own requests in flight
// where it tells them) that ends Idle, not Stopped: the pool's next use
// starts it again, and nothing is a crash. An engine that can sleep could
// sleep here instead of stopping; the manager only asks for a park.

// ReasonGroup is the journal's REASON= of a pool parked for another pool
// of its group.
const ReasonGroup = "group"

// ParkRequested: give the pool's GPUs to another pool of its group, after
// a drain bounded by Deadline; the pool ends Idle. An Idle pool is parked
// already; a drain under way is joined (and ends as that drain ends).
type ParkRequested struct {
	Req      ReqID
	Deadline time.Duration
}

func (ParkRequested) event() {}

func (m *Machine) parkRequested(e ParkRequested) {
	if m.state == Idle && m.run == nil {
		m.reply(Reply{Req: e.Req, Drain: DrainResult{Outcome: Drained, LeasesDrainedAt: m.now, Done: m.now}})
		return
	}
	if m.drain != nil {
		m.drainRequested(DrainRequested{Req: e.Req, Deadline: e.Deadline})
		return
	}
	m.parking = true
	defer func() { m.parking = false }()
	m.drainRequested(DrainRequested{Req: e.Req, Deadline: e.Deadline})
	if d := m.drain; d != nil && d.reload == nil {
		d.park = true
	}
}

// drainedTo ends a drain: Stopped, or Idle for a park.
func (m *Machine) drainedTo(park bool) {
	m.transition(Stopped, "drained")
	if !park {
		return
	}
	// Through Stopped, as a pool idle before a daemon restart comes back.
	m.transition(Idle, "parked for another pool of its group")
	m.idleSince = m.now
	m.log(slog.LevelInfo, "pool parked: its GPUs go to another pool of its group", journal.Reason, ReasonGroup)
}
