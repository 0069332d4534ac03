package lifecycle

import (
	"fmt"
	"log/slog"
	"time"

	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/safetext"
)

// Pools that share GPUs (one [Pool] Group=) take turns: the manager parks
// the awake member before it starts the one asked for. A park is a drain
// (leases honoured up to its deadline, the engine's own requests in flight
// where it tells them) that ends Idle, not Stopped: the pool's next use
// starts it again, and nothing is a crash. An engine that can sleep
// (Sleep=vllm) is put to sleep instead of stopped, and the park ends
// Sleeping once the engine says it sleeps: asleep, it keeps little of the
// GPU's memory (level 1 moves its weights to the host), and its next use
// wakes it. A sleep it refuses stops it, as idleness does.

// ReasonGroup is the journal's REASON= of a pool parked for another pool
// of its group.
const ReasonGroup = "group"

// ParkRequested: give the pool's GPUs to another pool of its group, after
// a drain bounded by Deadline; the pool ends Idle (Sleeping where its
// engine sleeps). An Idle or sleeping pool is parked already; a drain
// under way is joined (and ends as that drain ends).
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
	if r := m.run; m.state == Sleeping && m.drain == nil && r != nil && r.stopping == NotStopping {
		// Asleep already, or about to be: its answer (settleParks)
		// answers the park.
		m.sleepParks = append(m.sleepParks, e.Req)
		return
	}
	// Joining a drain under way, a park is still a park: it does not
	// turn another park into an operator's stop.
	m.parking = true
	defer func() { m.parking = false }()
	m.drainRequested(DrainRequested{Req: e.Req, Deadline: e.Deadline})
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
	// A start on demand the park called off is over: its callers hear
	// it did not start (the GPUs went to another pool), not wait for
	// nothing.
	m.waking = false
	m.log(slog.LevelInfo, "pool parked: its GPUs go to another pool of its group", journal.Reason, ReasonGroup)
}

// sleepParked asks the engine of a park whose leases and requests are
// gone to sleep, where it can (Sleep=, healthy, not on its way in or out
// of sleep); it says whether it did. The Slept answer ends the park.
func (m *Machine) sleepParked(d *drainOp) bool {
	r := m.run
	if !m.cfg.Sleep || r == nil || r.stopping != NotStopping || !r.healthy || r.dead || r.candidate ||
		r.sleep != (sleepState{}) || m.pending != nil {
		return false
	}
	m.drainTo(d, drainSleeping)
	r.sleep = sleepState{asking: true}
	// The stall rule starts over when it wakes.
	r.movedAt, r.inFlight = time.Time{}, 0
	m.do(Sleep{Run: r.id, Level: max(m.cfg.SleepLevel, 1)})
	m.log(slog.LevelInfo, "pool parked: engine asked to sleep to give its GPU memory to another pool of its group", journal.Reason, ReasonGroup)
	return true
}

// parkSlept: the engine of a park answered its Sleep. Asleep, the park is
// over; one that did not sleep is stopped, and its exit ends the park
// (Idle).
func (m *Machine) parkSlept(d *drainOp, r *run, err error) {
	r.sleep.asking = false
	if err != nil {
		msg := safetext.Bound(err.Error())
		m.lastErr = "sleep failed: " + msg
		m.log(slog.LevelWarn, "engine did not sleep: stopped instead", journal.Error, msg, journal.Reason, ReasonGroup)
		m.drainTo(d, drainStopping)
		m.stopRun(StopDrain)
		return
	}
	r.sleep.asleep = true
	m.finishDrain()
}

// parkedAsleep ends a park whose engine sleeps.
func (m *Machine) parkedAsleep() {
	m.run.sleep.parked = true
	m.transition(Sleeping, "parked asleep")
	m.idleSince = m.now
	// Recorded before the park is answered and another member starts.
	m.recordSleep()
	m.log(slog.LevelInfo, "pool parked: its GPUs go to another pool of its group", journal.Reason, ReasonGroup,
		journal.NewState, Sleeping.String())
}

// settleParks answers the parks of a sleeping pool once its engine is
// asleep, or stopped (a refused sleep: Idle); one that left both (it
// crashed, or was woken) was not parked.
func (m *Machine) settleParks() {
	if len(m.sleepParks) == 0 {
		return
	}
	var err error
	switch r := m.run; {
	case m.state == Sleeping && r != nil && r.sleep.asking && r.stopping == NotStopping:
		return
	case m.state == Idle && r != nil:
		// Its engine is still being stopped.
		return
	case m.state == Sleeping && r != nil && r.sleep.asleep && r.stopping == NotStopping, m.state == Idle:
	default:
		err = fmt.Errorf("pool %s is %s: not parked: %w", m.cfg.Pool, m.state, ErrBusy)
	}
	if r := m.run; err == nil && r != nil && m.state == Sleeping {
		r.sleep.parked = true
		m.recordSleep()
	}
	reqs := m.sleepParks
	m.sleepParks = nil
	for _, req := range reqs {
		if err != nil {
			m.reply(Reply{Req: req, Err: err})
			continue
		}
		m.reply(Reply{Req: req, Drain: DrainResult{Outcome: Drained, LeasesDrainedAt: m.now, Done: m.now}})
	}
}
