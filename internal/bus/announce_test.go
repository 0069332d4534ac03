package bus

import (
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/stretchr/testify/assert"
)

func props(kv ...any) map[string]any {
	m := map[string]any{"Ready": true, "ActiveLeases": uint32(0), "Progress": 0.0, "Operation": ""}
	for i := 0; i < len(kv); i += 2 {
		m[kv[i].(string)] = kv[i+1]
	}
	return m
}

func said(changed map[string]dbus.Variant) map[string]any {
	m := map[string]any{}
	for k, v := range changed {
		m[k] = v.Value()
	}
	return m
}

// A router's lease calls change ActiveLeases in bursts: the first change
// after a quiet while is sent at once, the rest of the burst at most once
// per leasesEvery with the latest count, and nothing when the count came
// back to what was said.
func TestLeaseChangesAreSentOncePerWindow(t *testing.T) {
	t0 := time.Unix(1000, 0)
	a := newAnnouncer(props())
	assert.Equal(t, map[string]any{"ActiveLeases": uint32(1)}, said(a.change(t0, props("ActiveLeases", uint32(1)))), "the first change at once")
	assert.True(t, a.due.IsZero())

	at := t0.Add(time.Millisecond)
	assert.Empty(t, a.change(at, props("ActiveLeases", uint32(2))), "held within the window")
	assert.Equal(t, t0.Add(leasesEvery), a.due)
	assert.Empty(t, a.change(at.Add(time.Millisecond), props("ActiveLeases", uint32(3))))
	assert.Equal(t, map[string]any{"ActiveLeases": uint32(3)}, said(a.change(a.due, props("ActiveLeases", uint32(3)))), "the latest, when due")
	assert.True(t, a.due.IsZero())

	// Up and back down within the window: nothing to say.
	next := t0.Add(leasesEvery)
	assert.Empty(t, a.change(next.Add(time.Millisecond), props("ActiveLeases", uint32(4))))
	assert.False(t, a.due.IsZero())
	assert.Empty(t, a.change(next.Add(2*time.Millisecond), props("ActiveLeases", uint32(3))))
	assert.True(t, a.due.IsZero(), "nothing held")
}

// Any other change is sent at once, with what was held.
func TestOtherChangesAreNotHeld(t *testing.T) {
	t0 := time.Unix(1000, 0)
	a := newAnnouncer(props())
	a.change(t0, props("ActiveLeases", uint32(1)))
	assert.Empty(t, a.change(t0.Add(time.Millisecond), props("ActiveLeases", uint32(2))))
	assert.Equal(t, map[string]any{"ActiveLeases": uint32(2), "Ready": false},
		said(a.change(t0.Add(2*time.Millisecond), props("ActiveLeases", uint32(2), "Ready", false))))
	assert.True(t, a.due.IsZero())
	assert.Equal(t, map[string]any{"Operation": "draining"},
		said(a.change(t0.Add(3*time.Millisecond), props("ActiveLeases", uint32(2), "Ready", false, "Operation", "draining"))))
}

// Progress alone is sent at most every progressEvery, the latest value
// when due; with ActiveLeases (a drain's releases) both bounds hold.
func TestProgressIsSentAtMostFourTimesASecond(t *testing.T) {
	t0 := time.Unix(1000, 0)
	a := newAnnouncer(props())
	assert.Equal(t, map[string]any{"Progress": 0.1}, said(a.change(t0, props("Progress", 0.1))))
	assert.Empty(t, a.change(t0.Add(10*time.Millisecond), props("Progress", 0.2)))
	assert.Equal(t, t0.Add(progressEvery), a.due)
	assert.Equal(t, map[string]any{"Progress": 0.3}, said(a.change(a.due, props("Progress", 0.3))))

	t1 := t0.Add(progressEvery + 10*time.Millisecond)
	assert.Empty(t, a.change(t1, props("Progress", 0.5, "ActiveLeases", uint32(1))))
	assert.Equal(t, t0.Add(2*progressEvery), a.due, "the later of the two bounds")
}
