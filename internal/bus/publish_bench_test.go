package bus

import (
	"testing"
	"time"

	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/supervisor"
)

// BenchmarkPublishOneChange is the publisher's work for one snapshot
// change that changes one property (a lease taken), up to the signal:
// the comparison Wait makes, the properties that changed and their new
// values. A lease call pays it on the same CPUs as its reply.
func BenchmarkPublishOneChange(b *testing.B) {
	snap := supervisor.Snapshot{ID: "llama-8b", Unit: "pool-engine-llama-8b.scope", DeviceMask: "GPU-8f2c1a70-0000-4000-8000-000000000000"}
	snap.View = lifecycle.View{State: lifecycle.Ready, Live: true, Ready: true, Model: "llama-3-8b.gguf", ModelDigest: "sha256:0123456789abcdef", MainPID: 4242}
	last := properties(snap)
	b.ReportAllocs()
	for i := range b.N {
		snap.ActiveLeases = uint32(i%2 + 1)
		cur, changed := propertyChanges(func(cond func(supervisor.Snapshot) bool) supervisor.Snapshot {
			if !cond(snap) {
				b.Fatal("a change not seen")
			}
			return snap
		}, last)
		if len(changed) != 1 {
			b.Fatalf("%d properties changed, want 1", len(changed))
		}
		last = cur
	}
}

// propertyChanges is one change as the publisher sees it: the new
// properties and those that changed.
func propertyChanges(wait func(cond func(supervisor.Snapshot) bool) supervisor.Snapshot, last map[string]any) (map[string]any, map[string]any) {
	_, cur := waitChange(wait, last)
	changed := map[string]any{}
	for k, v := range cur {
		if v != last[k] {
			changed[k] = v
		}
	}
	return cur, changed
}

// The publisher's comparison sees a change of any one property, of any of
// its types, and only a change.
func TestSamePropertiesSeesEveryChange(t *testing.T) {
	var snap supervisor.Snapshot
	snap.View = lifecycle.View{State: lifecycle.Ready, Ready: true, Progress: 0.5, LastError: "x"}
	base := properties(snap)
	if !sameProperties(base, properties(snap)) {
		t.Fatal("the same snapshot compared unequal")
	}
	for name, change := range map[string]func(*supervisor.Snapshot){
		"Ready":         func(s *supervisor.Snapshot) { s.Ready = false },
		"ActiveLeases":  func(s *supervisor.Snapshot) { s.ActiveLeases = 1 },
		"MainPID":       func(s *supervisor.Snapshot) { s.MainPID = 7 },
		"Progress":      func(s *supervisor.Snapshot) { s.Progress = 0.75 },
		"LastError":     func(s *supervisor.Snapshot) { s.LastError = "y" },
		"IdleSinceUSec": func(s *supervisor.Snapshot) { s.IdleSince = time.Unix(1, 0) },
	} {
		s := snap
		change(&s)
		if sameProperties(base, properties(s)) {
			t.Errorf("a change of %s was not seen", name)
		}
	}
	short := properties(snap)
	delete(short, "Ready")
	if sameProperties(base, short) || sameProperties(short, base) {
		t.Error("a missing property was not seen")
	}
}
