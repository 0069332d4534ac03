package witness

import (
	"fmt"
	"time"
)

// Kind is what systemd saw happen to a unit.
type Kind int

const (
	// Started: the scope became active (a new invocation), or was first
	// seen active.
	Started Kind = iota + 1
	// Stopping: a stop job began (systemd has sent SIGTERM).
	Stopping
	// Dead: the scope left its running states (inactive or failed).
	Dead
	// Removed: systemd unloaded the unit.
	Removed
)

func (k Kind) String() string {
	switch k {
	case Started:
		return "started"
	case Stopping:
		return "stopping"
	case Dead:
		return "dead"
	case Removed:
		return "removed"
	}
	return fmt.Sprintf("kind %d", int(k))
}

// Cause says why a scope stops or died.
type Cause int

const (
	// NoCause: a Started event, or a Removed after a death already told.
	NoCause Cause = iota
	// OurStop: a stop job the daemon announced with ExpectStop.
	OurStop
	// OperatorStop: a stop job anyone else queued (systemctl stop, a stop
	// of the slice, a shutdown).
	OperatorStop
	// Emptied: every process of the scope ended and no stop job was
	// running. systemd reports the same for a systemctl kill, an OOM kill
	// under cgroup v1 and an engine that simply exited (Result=success):
	// only the shim's wait status tells them apart.
	Emptied
	// OOMKilled: Result=oom-kill: a kernel OOM kill under cgroup v2, or
	// systemd-oomd.
	OOMKilled
	// TimedOut: Result=timeout with no stop job: RuntimeMaxSec= ran out.
	TimedOut
	// Vanished: unloaded while running, with no death seen.
	Vanished
)

func (c Cause) String() string {
	switch c {
	case NoCause:
		return "none"
	case OurStop:
		return "our stop"
	case OperatorStop:
		return "operator stop"
	case Emptied:
		return "processes gone"
	case OOMKilled:
		return "oom-kill"
	case TimedOut:
		return "timeout"
	case Vanished:
		return "vanished"
	}
	return fmt.Sprintf("cause %d", int(c))
}

// Event is one thing systemd told about one of our scopes.
type Event struct {
	Unit  string
	Kind  Kind
	Cause Cause
	// ActiveState, SubState and Result (the Scope's) as last reported.
	ActiveState, SubState, Result string
	// Invocation is the scope's InvocationID in hex: one per start, so a
	// late event of an earlier scope of the same name can be told apart.
	Invocation string
	// Job is the stop job (OurStop and OperatorStop).
	Job uint32
	// Changed is when systemd changed the state (StateChangeTimestamp);
	// zero for Removed.
	Changed time.Time
	// At is when the witness received it.
	At time.Time
}

func (e Event) String() string {
	return fmt.Sprintf("%s %s (%s) %s/%s Result=%s", e.Unit, e.Kind, e.Cause, e.ActiveState, e.SubState, e.Result)
}

type obsKind int

const (
	obsUnit        obsKind = iota + 1 // PropertiesChanged of org.freedesktop.systemd1.Unit
	obsScope                          // PropertiesChanged of org.freedesktop.systemd1.Scope
	obsJobRemoved                     // Manager.JobRemoved
	obsUnitRemoved                    // Manager.UnitRemoved
)

// observation is one signal about one unit; empty strings are
// properties the signal did not carry.
type observation struct {
	kind        obsKind
	active, sub string
	result      string
	invocation  string
	hasJob      bool
	job         uint32 // the unit's Job (0: none), or the removed job
	jobResult   string
	changed     time.Time
}

// mark is a stop the daemon announced: unbound until told its job.
type mark struct {
	job   uint32
	bound bool
}

// tracker is what the witness knows of one unit, and the classification:
// pure, fed the unit's signals in the order systemd sent them.
//
// What systemd 252 sends for a scope (Scope's Result always in the
// PropertiesChanged just before the Unit's; the Unit's carries Job and
// InvocationID):
//
//	creation:        inactive/dead Job=N, active/running Job=N, JobRemoved N done, active/running Job=0
//	systemctl stop:  active/running Job=N, deactivating/stop-sigterm Job=N, inactive/dead Job=N,
//	                 JobRemoved N done, inactive/dead Job=0, UnitRemoved; Result=success
//	stop, SIGTERM ignored past TimeoutStopSec: ... stop-sigterm, Result=timeout stop-sigkill,
//	                 failed/failed Job=N, JobRemoved N done
//	systemctl kill:  inactive/dead Job=0, UnitRemoved; Result=success, no job
//	MemoryMax= OOM (cgroup v1 memory controller, this hybrid host): the same as
//	                 a kill: inactive/dead, Result=success, no job; under cgroup v2
//	                 Result=oom-kill (and OOMPolicy=stop: deactivating with no job first)
//
// So a job is a stop when it shows while the scope runs (a start job shows
// while it is inactive), and a scope that dies with no stop job pending
// died of its processes' ending.
type tracker struct {
	unit                            string
	active, sub, result, invocation string
	changed                         time.Time
	known                           bool // Unit properties seen
	live                            bool // seen running in this invocation
	job                             uint32
	stopJob                         uint32 // the pending job seen while running
	stopCause                       Cause  // set once the stop is told (Stopping or Dead)
	dead                            bool
	marks                           []*mark
	removed                         [8]uint32 // jobs lately removed, for a late Stop.Job
	nRemoved                        int
}

func running(active string) bool {
	return active == "active" || active == "reloading" || active == "deactivating" || active == "activating"
}

func ended(active string) bool { return active == "inactive" || active == "failed" }

func (t *tracker) event(k Kind, c Cause, at time.Time) Event {
	e := Event{Unit: t.unit, Kind: k, Cause: c, ActiveState: t.active, SubState: t.sub, Result: t.result,
		Invocation: t.invocation, Changed: t.changed, At: at}
	if c == OurStop || c == OperatorStop {
		e.Job = t.stopJob
	}
	if k == Removed {
		e.Changed = time.Time{}
	}
	return e
}

// stopBy says whose the pending stop job is, taking the daemon's mark.
func (t *tracker) stopBy() Cause {
	for i, m := range t.marks {
		if !m.bound || m.job == t.stopJob {
			t.marks = append(t.marks[:i], t.marks[i+1:]...)
			return OurStop
		}
	}
	return OperatorStop
}

func (t *tracker) observe(o observation, at time.Time) []Event {
	switch o.kind {
	case obsScope:
		if o.result != "" {
			t.result = o.result
		}
		return nil
	case obsJobRemoved:
		t.jobRemoved(o.job)
		return nil
	case obsUnitRemoved:
		var evs []Event
		if t.known {
			c := NoCause
			if t.live && !t.dead {
				c = Vanished
			}
			evs = append(evs, t.event(Removed, c, at))
		}
		marks, removed, n := t.marks, t.removed, t.nRemoved
		*t = tracker{unit: t.unit, marks: marks, removed: removed, nRemoved: n}
		return evs
	case obsUnit:
	default:
		return nil
	}

	prev := t.active
	if o.invocation != "" && o.invocation != t.invocation {
		if t.invocation != "" {
			// A new start under the same name.
			t.live, t.dead, t.stopJob, t.stopCause, prev = false, false, 0, NoCause, ""
		}
		t.invocation = o.invocation
	}
	if o.active != "" {
		t.active = o.active
	}
	if o.sub != "" {
		t.sub = o.sub
	}
	if !o.changed.IsZero() {
		t.changed = o.changed
	}
	if o.hasJob {
		if o.job != 0 && o.job != t.job && (prev == "active" || prev == "reloading" || prev == "deactivating" || t.active == "deactivating" ||
			(prev == "" && t.active == "active")) {
			t.stopJob = o.job
		}
		t.job = o.job
	}
	wasKnown := t.known
	t.known = true

	var evs []Event
	switch {
	case running(t.active):
		if t.active == "active" && !t.live {
			evs = append(evs, t.event(Started, NoCause, at))
		}
		t.live = true
		if t.active == "deactivating" && t.stopCause == NoCause && t.stopJob != 0 && t.job == t.stopJob {
			t.stopCause = t.stopBy()
			evs = append(evs, t.event(Stopping, t.stopCause, at))
		}
	case ended(t.active):
		// Seen running before, or first seen dead with no job (a scope
		// that ran before the witness did): a start job on a new scope
		// shows while it is still inactive.
		if t.dead || (!t.live && (wasKnown || t.job != 0)) {
			break
		}
		t.dead = true
		c := t.stopCause
		switch {
		case c != NoCause:
		case t.stopJob != 0 && t.job == t.stopJob:
			c = t.stopBy()
			t.stopCause = c
		case t.result == "oom-kill":
			c = OOMKilled
		case t.result == "timeout":
			c = TimedOut
		default:
			c = Emptied
		}
		evs = append(evs, t.event(Dead, c, at))
	}
	return evs
}

func (t *tracker) jobRemoved(id uint32) {
	if t.job == id {
		t.job = 0
	}
	for i, m := range t.marks {
		if m.bound && m.job == id {
			t.marks = append(t.marks[:i], t.marks[i+1:]...)
			break
		}
	}
	t.removed[t.nRemoved%len(t.removed)] = id
	t.nRemoved++
}

// expect adds a mark for a stop about to be asked for.
func (t *tracker) expect() *mark {
	m := &mark{}
	t.marks = append(t.marks, m)
	return m
}

// bind tells a mark its job; a job already gone (a stop of a scope that
// was not running ends at once) takes the mark with it.
func (t *tracker) bind(m *mark, id uint32) {
	for _, r := range t.removed {
		if r == id && id != 0 {
			t.forget(m)
			return
		}
	}
	m.job, m.bound = id, true
}

func (t *tracker) forget(m *mark) {
	for i, x := range t.marks {
		if x == m {
			t.marks = append(t.marks[:i], t.marks[i+1:]...)
			return
		}
	}
}

// idle says the tracker holds nothing worth keeping once the unit is gone.
func (t *tracker) idle() bool { return !t.known && len(t.marks) == 0 }
