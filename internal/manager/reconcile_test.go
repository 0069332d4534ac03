package manager_test

import (
	"context"
	"os"
	"os/user"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/model"
	"github.com/llorch/pool-managerd/internal/supervisor"
)

func static(dir string) string { return staticConf(dir, "") }

// A reload starts added pools, drains and ends removed ones (off the
// registry first), drains a changed pool (serving on its old supervisor
// until then) and starts it again on its new configuration, and leaves an
// unchanged pool alone.
func TestApplyReconcilesPools(t *testing.T) {
	h := newHost(t, static, map[string]string{"a": "0", "b": "1", "d": "2"})
	m := h.open(nil, nil)
	assert.Equal(t, []string{"a", "b", "d"}, m.IDs())
	a, b, d := h.pool("a"), h.pool("b"), h.pool("d")
	require.Len(t, h.Built(), 3)
	for _, p := range []*fakePool{a, b, d} {
		assert.True(t, p.running(), "pool %s's loop runs", p.cfg.ID)
	}

	// The engines of a and b ran as users of their own.
	ua, err := h.users.For("a")
	require.NoError(t, err)
	_, err = h.users.For("b")
	require.NoError(t, err)

	h.writePools(map[string]string{"b": "1;[Pool];Slots=3", "c": "0", "d": "2"})
	next := h.load()
	require.NoError(t, m.Apply(next))
	assert.Equal(t, []string{"b", "c", "d"}, m.IDs())
	assert.Same(t, next, m.Config())
	recs, err := h.users.Records()
	require.NoError(t, err)
	assert.False(t, recs["a"].Removed.IsZero(), "the removed pool's user is retired")
	assert.Equal(t, ua.UID, recs["a"].UID, "and its uid kept for it")
	assert.True(t, recs["b"].Removed.IsZero(), "a changed pool's is not")

	assert.True(t, a.did("drain"), "the removed pool is drained")
	assert.False(t, a.drainedWhileServed, "and off the registry before")
	require.Eventually(t, func() bool { return !a.running() }, time.Second, 5*time.Millisecond, "its loop ends")

	assert.True(t, b.did("drain"), "the changed pool's old supervisor is drained")
	assert.True(t, b.drainedWhileServed, "serving until then")
	require.Eventually(t, func() bool { return !b.running() }, time.Second, 5*time.Millisecond)
	nb := h.pool("b")
	assert.NotSame(t, b, nb)
	assert.Equal(t, uint32(3), nb.cfg.Slots, "the new supervisor runs the new configuration")
	assert.True(t, nb.running())
	require.Eventually(t, func() bool { return nb.did("start") }, time.Second, 5*time.Millisecond, "and starts (AutoStart)")

	c := h.pool("c")
	assert.True(t, c.running())
	require.Eventually(t, func() bool { return c.did("start") }, time.Second, 5*time.Millisecond, "the added pool starts")

	assert.Same(t, d, h.pool("d"), "the unchanged pool keeps its supervisor")
	assert.Empty(t, d.Calls(), "and is not touched")
	assert.True(t, d.running())

	assert.Equal(t, "remove a", h.pub.Calls()[0], "the removed pool leaves the bus first")
	assert.ElementsMatch(t, []string{"remove a", "put b", "put c"}, h.pub.Calls())
	assert.Contains(t, h.logs.String(), "configuration reloaded: 1 pool(s) added, 1 removed, 1 changed")

	// The same configuration again changes nothing.
	require.NoError(t, m.Apply(h.load()))
	assert.Len(t, h.Built(), 5, "no pool built again")
	assert.Same(t, nb, h.pool("b"))
	assert.Len(t, h.pub.Calls(), 3)
	assert.Contains(t, h.logs.String(), "configuration reloaded: 0 pool(s) added, 0 removed, 0 changed")
}

// A pool that comes to name a User= leaves its own user retired (kept for
// it, not held forever).
func TestAPoolNamingAUserRetiresItsOwn(t *testing.T) {
	h := newHost(t, static, map[string]string{"a": "0"})
	m := h.open(nil, nil)
	own, err := h.users.For("a")
	require.NoError(t, err)
	h.writePools(map[string]string{"a": "0;User=nobody"})
	require.NoError(t, m.Apply(h.load()))
	recs, err := h.users.Records()
	require.NoError(t, err)
	assert.False(t, recs["a"].Removed.IsZero())
	assert.Equal(t, own.UID, recs["a"].UID)
}

// Engines a previous daemon left are adopted; a pool with none starts if
// it starts on its own.
func TestAdoptStartsWhatIsNotAdopted(t *testing.T) {
	h := newHost(t, static, map[string]string{"a": "0", "b": "1", "c": "2;[Pool];AutoStart=no"})
	m := h.open(nil, nil)
	h.pool("a").adoptable = true
	m.Adopt(context.Background(), func(string) bool { return true })
	require.Eventually(t, func() bool { return h.pool("b").did("start") }, time.Second, 5*time.Millisecond)
	assert.Equal(t, []string{"adopt"}, h.pool("a").Calls(), "an adopted engine is not started again")
	assert.Equal(t, []string{"adopt"}, h.pool("c").Calls(), "AutoStart=no")
}

// An XID reaches the pools on its GPU now, and no other.
func TestRouteXIDReachesTheOwningPoolsOnly(t *testing.T) {
	h := newHost(t, static, map[string]string{"a": "0", "b": "1 2", "c": "3"})
	m := h.open(nil, nil)
	a, b, c := h.pool("a"), h.pool("b"), h.pool("c")

	// 94 (a contained ECC error): a restart clears it, and it concerns
	// the device, so every pool on it restarts.
	m.RouteXID(gpuUUID[2], 94)
	assert.Equal(t, []string{"xid 94 " + gpuUUID[2]}, b.gpuCalls(), "either GPU of a two-GPU pool")
	assert.Empty(t, a.gpuCalls())
	assert.Empty(t, c.gpuCalls())
	lower := strings.ToLower(gpuUUID[0])
	m.RouteXID(lower, 94)
	assert.Equal(t, []string{"xid 94 " + lower}, a.gpuCalls(), "UUIDs match in any case")
	assert.Len(t, b.gpuCalls(), 1)
	assert.Empty(t, c.gpuCalls())

	// 43 (the application stopped): journaled, nothing more.
	m.RouteXID(gpuUUID[3], 43)
	assert.Empty(t, c.gpuCalls())
	assert.Contains(t, h.logs.String(), "GPU XID 43 on "+gpuUUID[3])
	// A GPU no pool uses.
	m.RouteXID("GPU-ffffffff-ffff-4fff-8fff-ffffffffffff", 31)
	assert.Contains(t, h.logs.String(), "GPU XID event on a GPU no pool uses")

	// 79 (fallen off the bus): its pools are held.
	m.RouteXID(gpuUUID[3], 79)
	require.Len(t, c.gpuCalls(), 1)
	assert.Contains(t, c.gpuCalls()[0], "unhealthy "+gpuUUID[3]+": GPU "+gpuUUID[3]+" is lost: Xid 79")
	assert.Len(t, a.gpuCalls(), 1)
	assert.Len(t, b.gpuCalls(), 1)
	assert.Equal(t, 1.0, testutil.ToFloat64(h.opts.Metrics.GPUUnhealthy.WithLabelValues(gpuUUID[3], "lost")))
	assert.Contains(t, h.logs.String(), "its pools are held, not restarted")

	// After a reload, the pools on a GPU are the new configuration's.
	h.writePools(map[string]string{"a": "0", "b": "1", "c": "2 3"})
	require.NoError(t, m.Apply(h.load()))
	nb, nc := h.pool("b"), h.pool("c")
	m.RouteXID(gpuUUID[2], 94)
	assert.Equal(t, []string{"xid 94 " + gpuUUID[2]}, nc.gpuCalls(), "GPU 2 is c's now")
	assert.Empty(t, nb.gpuCalls())
	assert.Len(t, b.gpuCalls(), 1, "the old supervisors get nothing more")
	assert.Len(t, c.gpuCalls(), 1)
	assert.Len(t, a.gpuCalls(), 1)
}

// Prune removes the staged models no pool's engine runs on; a reload
// prunes too.
func TestPruneKeepsModelsInUse(t *testing.T) {
	h := newHost(t, static, map[string]string{"a": "0", "b": "1"})
	m := h.open(nil, nil)
	me, err := user.Current()
	require.NoError(t, err)
	stage := func(id string) string {
		src := filepath.Join(h.dir, "models", id+".gguf")
		require.NoError(t, os.WriteFile(src, []byte("GGUF\x03\x00\x00\x00 "+id), 0o644))
		u, err := model.LookupUser(me.Username)
		require.NoError(t, err)
		st, err := h.opts.Stager.Stage(src, "", u)
		require.NoError(t, err)
		return st.Path
	}
	sa, sb := stage("a"), stage("b")
	h.pool("a").set(func(s *supervisor.Snapshot) { s.StagedPath = sa })

	m.Prune()
	assert.FileExists(t, sa, "pool a's engine runs on it")
	assert.NoFileExists(t, sb, "no engine runs on it")

	sb = stage("b")
	h.pool("b").set(func(s *supervisor.Snapshot) { s.StagedPath = sb })
	h.writePools(map[string]string{"b": "1"})
	require.NoError(t, m.Apply(h.load()))
	assert.NoFileExists(t, sa, "the removed pool's model")
	assert.FileExists(t, sb)
	assert.FileExists(t, filepath.Join(h.dir, "models", "a.gguf"), "sources are never touched")
}

// A pool between staging its model and its engine's start does not report
// the file yet: a prune then waits for its next turn instead of taking the
// file from under the start (a configuration reload prunes while a
// changed pool stages its new model).
func TestPruneWaitsForAPoolThatIsStarting(t *testing.T) {
	h := newHost(t, static, map[string]string{"a": "0"})
	m := h.open(nil, nil)
	me, err := user.Current()
	require.NoError(t, err)
	src := filepath.Join(h.dir, "models", "a.gguf")
	require.NoError(t, os.WriteFile(src, []byte("GGUF\x03\x00\x00\x00 a"), 0o644))
	u, err := model.LookupUser(me.Username)
	require.NoError(t, err)
	st, err := h.opts.Stager.Stage(src, "", u)
	require.NoError(t, err)
	for _, during := range []func(*supervisor.Snapshot){
		func(s *supervisor.Snapshot) { s.State, s.Live, s.StagedPath = lifecycle.Starting, false, "" },
		func(s *supervisor.Snapshot) { s.State, s.Live, s.StagedPath = lifecycle.Backoff, false, "" },
		func(s *supervisor.Snapshot) {
			s.State, s.Live, s.Operation, s.StagedPath = lifecycle.Draining, true, "staging", ""
		},
	} {
		h.pool("a").set(during)
		m.Prune()
		assert.FileExists(t, st.Path, "staged for a start under way")
	}
	h.pool("a").set(func(s *supervisor.Snapshot) {
		s.State, s.Live, s.Operation, s.StagedPath = lifecycle.Stopped, false, "", ""
	})
	m.Prune()
	assert.NoFileExists(t, st.Path, "no pool runs on it, none is starting")
}

// The status counts the pools by state, and is told again on each change.
func TestStatusFollowsThePools(t *testing.T) {
	h := newHost(t, static, map[string]string{"a": "0", "b": "1", "c": "2"})
	m := h.open(nil, nil)
	assert.Equal(t, "0/3 pools ready, 3 stopped", m.Status())
	assert.True(t, m.Settled())

	var mu sync.Mutex
	var told []string
	last := func() string {
		mu.Lock()
		defer mu.Unlock()
		if len(told) == 0 {
			return ""
		}
		return told[len(told)-1]
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go m.KeepStatus(ctx, func(st string) {
		mu.Lock()
		defer mu.Unlock()
		told = append(told, st)
	})
	require.Eventually(t, func() bool { return last() == "0/3 pools ready, 3 stopped" }, time.Second, 5*time.Millisecond)
	h.pool("a").set(func(s *supervisor.Snapshot) { s.State = lifecycle.Ready })
	h.pool("b").set(func(s *supervisor.Snapshot) { s.State = lifecycle.Starting })
	require.Eventually(t, func() bool { return last() == "1/3 pools ready, 1 starting, 1 stopped" }, time.Second, 5*time.Millisecond, "%q", last())
	assert.False(t, m.Settled(), "a pool is starting")

	// After a reload the new pools are watched.
	h.writePools(map[string]string{"a": "0", "b": "1", "c": "2", "d": "3"})
	require.NoError(t, m.Apply(h.load()))
	require.Eventually(t, func() bool { return h.pool("d").did("start") }, time.Second, 5*time.Millisecond)
	h.pool("d").set(func(s *supervisor.Snapshot) { s.State = lifecycle.Failed })
	require.Eventually(t, func() bool { return last() == "1/4 pools ready, 1 starting, 1 failed, 1 stopped" }, time.Second, 5*time.Millisecond)

	// An idle pool is counted, and has arrived.
	h.pool("b").set(func(s *supervisor.Snapshot) { s.State = lifecycle.Idle })
	require.Eventually(t, func() bool { return last() == "1/4 pools ready, 1 failed, 1 stopped, 1 idle" }, time.Second, 5*time.Millisecond, "%q", last())
	assert.True(t, m.Settled(), "an idle pool is settled")

	// So is a sleeping one; a waking one is on its way.
	h.pool("b").set(func(s *supervisor.Snapshot) { s.State = lifecycle.Sleeping })
	require.Eventually(t, func() bool { return last() == "1/4 pools ready, 1 failed, 1 stopped, 1 sleeping" }, time.Second, 5*time.Millisecond, "%q", last())
	assert.True(t, m.Settled(), "a sleeping pool is settled")
	h.pool("b").set(func(s *supervisor.Snapshot) { s.State = lifecycle.Waking })
	require.Eventually(t, func() bool { return last() == "1/4 pools ready, 1 failed, 1 stopped, 1 waking" }, time.Second, 5*time.Millisecond, "%q", last())
	assert.False(t, m.Settled(), "a waking pool is on its way")
}

// The watchdog is petted while every pool's loop answers, and no more once
// one hangs.
func TestWatchdogStopsOnAHungLoop(t *testing.T) {
	h := newHost(t, static, map[string]string{"a": "0", "b": "1"})
	m := h.open(nil, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var mu sync.Mutex
	pets := 0
	count := func() int {
		mu.Lock()
		defer mu.Unlock()
		return pets
	}
	go m.Watchdog(ctx, 20*time.Millisecond, func() {
		mu.Lock()
		defer mu.Unlock()
		pets++
	})
	require.Eventually(t, func() bool { return count() >= 3 }, time.Second, 5*time.Millisecond)
	b := h.pool("b")
	b.mu.Lock()
	b.hung = true
	b.mu.Unlock()
	require.Eventually(t, func() bool { return strings.Contains(h.logs.String(), "pool b: loop hung") }, time.Second, 5*time.Millisecond)
	n := count()
	assert.Never(t, func() bool { return count() > n }, 200*time.Millisecond, 10*time.Millisecond, "no petting while b hangs")
	assert.Contains(t, h.logs.String(), "watchdog: a pool's loop does not answer")
}

// A reload that changes an idle (or sleeping) pool on demand keeps it
// idle: the change applies at its next start, and nothing starts it. A
// change that makes it no pool on demand (IdleStopSec= gone) starts it
// as AutoStart= says.
func TestApplyKeepsAChangedIdlePoolIdle(t *testing.T) {
	h := newHost(t, static, map[string]string{"a": "0;[Pool];IdleStopSec=60", "b": "1;[Pool];IdleStopSec=60", "c": "2;[Pool];IdleStopSec=60"})
	m := h.open(nil, nil)
	since := time.Now().Add(-time.Minute).Truncate(time.Second)
	h.pool("a").set(func(s *supervisor.Snapshot) { s.State, s.IdleSince = lifecycle.Idle, since })
	h.pool("b").set(func(s *supervisor.Snapshot) { s.State, s.IdleSince, s.Live = lifecycle.Sleeping, since, true })
	h.pool("c").set(func(s *supervisor.Snapshot) { s.State, s.IdleSince = lifecycle.Idle, since })

	h.writePools(map[string]string{"a": "0;[Pool];IdleStopSec=60;Slots=3", "b": "1;[Pool];IdleStopSec=60;Slots=3", "c": "2;[Pool];Slots=3"})
	require.NoError(t, m.Apply(h.load()))
	for _, id := range []string{"a", "b"} {
		n := h.pool(id)
		assert.Equal(t, uint32(3), n.cfg.Slots, "pool %s runs its new configuration", id)
		assert.True(t, n.did("keep idle"), "pool %s: %v", id, n.Calls())
		assert.Equal(t, lifecycle.Idle, n.Snapshot().State)
		assert.Equal(t, since, n.Snapshot().IdleSince, "idle since it was")
	}
	nc := h.pool("c")
	require.Eventually(t, func() bool { return nc.did("start") }, time.Second, 5*time.Millisecond, "no pool on demand any more: AutoStart")
	time.Sleep(50 * time.Millisecond)
	for _, id := range []string{"a", "b"} {
		assert.False(t, h.pool(id).did("start"), "pool %s is not started", id)
	}
	assert.Contains(t, h.logs.String(), "pool changed while idle stays idle")
}
