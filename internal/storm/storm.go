// Package storm bounds how often a pool restarts: a sliding window of recent
// restarts, a warning when it fills past half, and a verdict naming the kind
// of storm when it is full.
package storm

import (
	"fmt"
	"time"

	"github.com/llorch/pool-managerd/internal/crash"
)

// Params are the [Restart] storm settings of a pool.
type Params struct {
	// Max is the number of restarts allowed in any Window.
	Max    int
	Window time.Duration
}

// Defaults are the seed's numbers.
func Defaults() Params { return Params{Max: 10, Window: 60 * time.Second} }

// Validate reports settings that cannot work.
func (p Params) Validate() error {
	switch {
	case p.Max < 1:
		return fmt.Errorf("maximum restarts must be at least 1, got %d", p.Max)
	case p.Window <= 0:
		return fmt.Errorf("window must be positive, got %s", p.Window)
	}
	return nil
}

// WarnAt is the restart count in the window past which a warning is due:
// past half of the limit.
func (p Params) WarnAt() int { return p.Max / 2 }

type restart struct {
	at     time.Time
	reason crash.Reason
}

// Window is the sliding window of one pool's restarts. Times passed to it
// never go backwards.
type Window struct {
	p        Params
	restarts []restart
}

// NewWindow returns an empty window.
func NewWindow(p Params) *Window { return &Window{p: p} }

func (w *Window) prune(now time.Time) {
	cut := now.Add(-w.p.Window)
	i := 0
	for i < len(w.restarts) && !w.restarts[i].at.After(cut) {
		i++
	}
	w.restarts = w.restarts[i:]
}

// Add records a restart at now, caused by a crash of the given reason.
func (w *Window) Add(now time.Time, reason crash.Reason) {
	w.prune(now)
	w.restarts = append(w.restarts, restart{now, reason})
}

// Count is the number of restarts in (now-Window, now].
func (w *Window) Count(now time.Time) int {
	cut := now.Add(-w.p.Window)
	n := 0
	for _, r := range w.restarts {
		if r.at.After(cut) && !r.at.After(now) {
			n++
		}
	}
	return n
}

// Prune forgets the restarts that have left the window at now.
func (w *Window) Prune(now time.Time) { w.prune(now) }

// NextExit is when the oldest restart kept leaves the window (zero if none
// is kept): the restart count falls then with nothing else happening.
// Call it after Prune or Add at the current time.
func (w *Window) NextExit() time.Time {
	if len(w.restarts) == 0 {
		return time.Time{}
	}
	return w.restarts[0].at.Add(w.p.Window)
}

// AllowedAt is the earliest time not before t at which one more restart
// fits in the window.
func (w *Window) AllowedAt(t time.Time) time.Time {
	var in []restart
	for _, r := range w.restarts {
		if r.at.After(t.Add(-w.p.Window)) {
			in = append(in, r)
		}
	}
	if len(in) < w.p.Max {
		return t
	}
	return in[len(in)-w.p.Max].at.Add(w.p.Window)
}

// Kind names what a storm is made of.
type Kind string

const (
	ProcessStorm Kind = "process_storm"
	OOMStorm     Kind = "oom_storm"
	HealthStorm  Kind = "health_storm"
	CUDAStorm    Kind = "cuda_storm"
	StartStorm   Kind = "start_storm"
	MixedStorm   Kind = "mixed_storm"
)

var kindOf = map[crash.Class]Kind{
	crash.ClassProcess: ProcessStorm,
	crash.ClassOOM:     OOMStorm,
	crash.ClassHealth:  HealthStorm,
	crash.ClassCUDA:    CUDAStorm,
	crash.ClassStart:   StartStorm,
}

// KindOf is the kind of storm that failures of one class make
// (MixedStorm for the general class).
func KindOf(c crash.Class) Kind {
	if k, ok := kindOf[c]; ok {
		return k
	}
	return MixedStorm
}

// Classify names a storm by the class that caused more than half of its
// restarts, or MixedStorm when none did. It returns the dominant class
// (crash.ClassGeneral for a mixed storm) so the matching breaker can open.
func Classify(reasons []crash.Reason) (Kind, crash.Class) {
	n := map[crash.Class]int{}
	for _, r := range reasons {
		n[r.Class()]++
	}
	for _, c := range crash.Classes {
		if 2*n[c] > len(reasons) {
			return kindOf[c], c
		}
	}
	return MixedStorm, crash.ClassGeneral
}

// Reasons returns the crash reasons of the restarts in the window at now,
// oldest first.
func (w *Window) Reasons(now time.Time) []crash.Reason {
	cut := now.Add(-w.p.Window)
	var out []crash.Reason
	for _, r := range w.restarts {
		if r.at.After(cut) && !r.at.After(now) {
			out = append(out, r.reason)
		}
	}
	return out
}

// Hint is what an operator should look at first for this kind of storm.
func (k Kind) Hint() string {
	switch k {
	case OOMStorm:
		return "the engine keeps being killed for memory: lower its context or batch size, use a smaller quantization, or raise MemoryMax= in the pool's [Scope] section"
	case CUDAStorm:
		return "the GPU keeps faulting: look for Xid errors in the kernel log and nvidia-smi -q, lower -ngl or the context size, and drain the pool to reset the GPU if it persists"
	case HealthStorm:
		return "the engine stops answering its health probe: check HealthURL=, raise [Health] TimeoutSec= or StartTimeoutSec=, and look for a hung engine in its journal"
	case StartStorm:
		return "the engine fails to start: check ExecStart=, User=, the model path and the pool's device access"
	case ProcessStorm:
		return "the engine keeps exiting: read its output with journalctl -u pool-engine-<id>.scope, and check ExecStart=, the model file and the engine version"
	}
	return "the engine fails in several ways at once: check the host (GPU health, memory, driver) before the engine"
}

// Restart is one restart in the window, as persisted.
type Restart struct {
	At     time.Time    `json:"at"`
	Reason crash.Reason `json:"reason"`
}

// Save returns the restarts in the window.
func (w *Window) Save() []Restart {
	out := make([]Restart, len(w.restarts))
	for i, r := range w.restarts {
		out[i] = Restart{r.at, r.reason}
	}
	return out
}

// Restore puts back saved restarts, oldest first.
func (w *Window) Restore(rs []Restart) {
	w.restarts = w.restarts[:0]
	for _, r := range rs {
		if n := len(w.restarts); n == 0 || !r.At.Before(w.restarts[n-1].at) {
			w.restarts = append(w.restarts, restart{r.At, r.Reason})
		}
	}
}
