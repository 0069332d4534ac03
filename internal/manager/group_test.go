package manager_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh100"

	"github.com/llorch/pool-managerd/internal/gpu"
	"github.com/llorch/pool-managerd/internal/gpu/nvmlmock"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/supervisor"
)

// member is a pool file of group chat on GPU 0.
const member = "0;[Pool];Group=chat;GroupDrainSec=7"

// readyNow makes a fake pool Ready, as its engine would be.
func readyNow(p *fakePool) {
	p.set(func(s *supervisor.Snapshot) { s.State, s.Live, s.Ready = lifecycle.Ready, true, true })
}

func gate(p *fakePool) chan struct{} {
	ch := make(chan struct{})
	p.mu.Lock()
	p.parkGate = ch
	p.mu.Unlock()
	return ch
}

// ensure runs EnsureReady in the background; its result comes on the
// channel.
func ensure(m interface {
	EnsureReady(context.Context, string, time.Duration) error
}, pool string) chan error {
	ch := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		ch <- m.EnsureReady(ctx, pool, 0)
	}()
	return ch
}

func swaps(h *host) float64 {
	return testutil.ToFloat64(h.m.Metrics().GroupSwaps.WithLabelValues("chat"))
}

// Asking for a parked member parks the awake one first, with its own
// GroupDrainSec=, and only then starts the one asked for; the swap is
// counted, timed and journaled. A request for the awake member is served
// at once.
func TestGroupSwapParksTheAwakeMemberFirst(t *testing.T) {
	h := newHost(t, static, map[string]string{"a": member, "b": member, "x": "1"})
	m := h.open(nil, nil)
	a, b := h.pool("a"), h.pool("b")
	readyNow(a)
	readyNow(h.pool("x"))

	require.NoError(t, m.EnsureReady(context.Background(), "a", 0))
	assert.Equal(t, []string{"ensure"}, a.Calls(), "the awake member is served at once")
	require.NoError(t, m.EnsureReady(context.Background(), "x", 0))
	assert.Zero(t, swaps(h))

	open := gate(a)
	done := ensure(m, "b")
	require.Eventually(t, func() bool { return a.did("park 7s") }, 5*time.Second, 5*time.Millisecond, "a is parked with its GroupDrainSec=")
	assert.Never(t, func() bool { return b.did("ensure") }, 100*time.Millisecond, 10*time.Millisecond, "b waits for a's drain")
	close(open)
	require.NoError(t, <-done)
	assert.Equal(t, []string{"ensure"}, b.Calls())
	assert.Equal(t, lifecycle.Idle, a.Snapshot().State)
	assert.Equal(t, lifecycle.Ready, b.Snapshot().State)
	assert.Equal(t, 1.0, swaps(h))
	assert.Equal(t, 1, testutil.CollectAndCount(h.m.Metrics().GroupSwapDuration))
	assert.Contains(t, h.logs.String(), `msg="group swap" POOL_ID=b GROUP=chat PARKED_POOLS=a`)
	assert.Contains(t, h.logs.String(), `msg="pool parked for another pool of its group" POOL_ID=a GROUP=chat REASON=group`)
	assert.Empty(t, h.pool("x").Calls()[1:], "a pool in no group is untouched")

	// And back.
	require.NoError(t, m.EnsureReady(context.Background(), "a", 0))
	assert.True(t, b.did("park 7s"))
	assert.Equal(t, 2.0, swaps(h))
}

// Requests for different members are served in order, each its turn; a
// request queued for the member a swap just woke is served with it, not
// by another swap; a request for the member being parked waits its turn.
func TestGroupTurnsInOrderWithoutThrash(t *testing.T) {
	h := newHost(t, static, map[string]string{"a": member, "b": member, "c": member})
	m := h.open(nil, nil)
	a, b, c := h.pool("a"), h.pool("b"), h.pool("c")
	readyNow(a)
	openA, openB := gate(a), gate(b)

	b1 := ensure(m, "b")
	require.Eventually(t, func() bool { return a.did("park 7s") }, 5*time.Second, 5*time.Millisecond)
	cc := ensure(m, "c")
	time.Sleep(20 * time.Millisecond) // c is queued before the next ones
	b2 := ensure(m, "b")
	aa := ensure(m, "a")
	time.Sleep(20 * time.Millisecond)
	for name, ch := range map[string]chan error{"b": b1, "c": cc, "b again": b2, "a": aa} {
		select {
		case err := <-ch:
			t.Fatalf("%s answered (%v) while a's drain is under way", name, err)
		default:
		}
	}
	close(openA)
	require.NoError(t, <-b1)
	require.NoError(t, <-b2, "the second request for b is served with the first")
	require.Eventually(t, func() bool { return b.did("park 7s") }, 5*time.Second, 5*time.Millisecond, "then c's turn parks b")
	assert.Equal(t, []string{"ensure", "ensure", "park 7s"}, b.Calls(), "b served twice before it is parked")
	assert.Empty(t, c.Calls(), "c waits for b's drain")
	close(openB)
	require.NoError(t, <-cc)
	require.NoError(t, <-aa, "a, asked while it was being parked, comes back in its turn")
	assert.Equal(t, []string{"ensure", "park 7s"}, c.Calls())
	assert.Equal(t, []string{"park 7s", "ensure"}, a.Calls())
	assert.Equal(t, 3.0, swaps(h), "a to b, b to c, c to a: one swap per turn, none for b's second request")
}

// A caller that leaves while it waits for its turn leaves the queue; the
// turns behind it go on.
func TestGroupCallerLeavesItsTurn(t *testing.T) {
	h := newHost(t, static, map[string]string{"a": member, "b": member, "c": member})
	m := h.open(nil, nil)
	a, b, c := h.pool("a"), h.pool("b"), h.pool("c")
	readyNow(a)
	open := gate(a)
	bb := ensure(m, "b")
	require.Eventually(t, func() bool { return a.did("park 7s") }, 5*time.Second, 5*time.Millisecond)
	ctx, cancel := context.WithCancel(context.Background())
	left := make(chan error, 1)
	go func() { left <- m.EnsureReady(ctx, "c", 0) }()
	time.Sleep(20 * time.Millisecond)
	cancel()
	err := <-left
	require.ErrorIs(t, err, context.Canceled)
	assert.Contains(t, err.Error(), "pool c: waiting for its turn in group chat")
	close(open)
	require.NoError(t, <-bb)
	assert.Never(t, func() bool { return len(c.Calls()) > 0 || b.did("park 7s") }, 100*time.Millisecond, 10*time.Millisecond,
		"the turn of the caller that left is not served")
}

// A lease on a parked member with StartOnLease= takes a turn: the awake
// member is parked, then the lease is asked of the started pool. Without
// StartOnLease= nothing is parked.
func TestGroupLeaseTakesATurn(t *testing.T) {
	h := newHost(t, static, map[string]string{"a": member, "b": member + ";StartOnLease=yes", "c": member})
	m := h.open(nil, nil)
	a, b, c := h.pool("a"), h.pool("b"), h.pool("c")
	readyNow(a)
	_, err := m.AcquireLease("c", ":1.5")
	require.ErrorIs(t, err, lifecycle.ErrNotReady)
	assert.Empty(t, a.Calls(), "c has no StartOnLease=: a stays")
	_, err = m.AcquireLease("b", ":1.5")
	require.ErrorIs(t, err, lifecycle.ErrNotReady, "the fake grants no lease")
	assert.Equal(t, []string{"park 7s"}, a.Calls())
	assert.Equal(t, []string{"ensure"}, b.Calls())
	assert.Empty(t, c.Calls())
}

// A park that fails refuses the turn (Busy), naming the member; nothing
// is started over its engine, and the next turn goes on.
func TestGroupParkFailureRefusesTheTurn(t *testing.T) {
	h := newHost(t, static, map[string]string{"a": member, "b": member})
	m := h.open(nil, nil)
	a, b := h.pool("a"), h.pool("b")
	readyNow(a)
	a.mu.Lock()
	a.parkErr = errors.New("loop hung")
	a.mu.Unlock()
	err := m.EnsureReady(context.Background(), "b", 0)
	require.ErrorIs(t, err, lifecycle.ErrBusy)
	assert.Contains(t, err.Error(), "pool b: cannot park pool a of group chat first: loop hung")
	assert.Empty(t, b.Calls())
	assert.Contains(t, h.logs.String(), `msg="cannot park the pool for another pool of its group" POOL_ID=a GROUP=chat ERROR="loop hung"`)
	a.mu.Lock()
	a.parkErr = nil
	a.mu.Unlock()
	require.NoError(t, m.EnsureReady(context.Background(), "b", 0), "the queue goes on")
}

// At daemon start one member of a group starts: the first by id that
// starts on its own, or the one adopted running; the others are parked;
// one the operator stopped stays stopped.
func TestGroupOneMemberStartsAtDaemonStart(t *testing.T) {
	t.Run("none running", func(t *testing.T) {
		h := newHost(t, static, map[string]string{"a": member + ";AutoStart=no", "b": member, "c": member, "x": "1"})
		m := h.open(nil, nil)
		m.Adopt(context.Background(), func(string) bool { return true })
		b := h.pool("b")
		require.Eventually(t, func() bool { return b.did("start") }, 5*time.Second, 5*time.Millisecond)
		require.Eventually(t, func() bool { return h.pool("x").did("start") }, 5*time.Second, 5*time.Millisecond)
		assert.Equal(t, []string{"adopt", "park 7s"}, h.pool("a").Calls())
		assert.Equal(t, []string{"adopt", "park 7s"}, h.pool("c").Calls())
		assert.Equal(t, lifecycle.Idle, h.pool("c").Snapshot().State)
	})
	t.Run("one adopted", func(t *testing.T) {
		h := newHost(t, static, map[string]string{"a": member, "b": member, "c": member})
		m := h.open(nil, nil)
		h.pool("b").adoptable = true
		readyNow(h.pool("b"))
		m.Adopt(context.Background(), func(string) bool { return true })
		for _, id := range []string{"a", "c"} {
			require.Eventually(t, func() bool { return h.pool(id).did("park 7s") }, 5*time.Second, 5*time.Millisecond)
			assert.False(t, h.pool(id).did("start"))
		}
		assert.Equal(t, []string{"adopt"}, h.pool("b").Calls())
	})
}

// asleepNow makes a fake pool Sleeping, as an engine adopted asleep is.
func asleepNow(p *fakePool) {
	p.set(func(s *supervisor.Snapshot) { s.State, s.Live, s.Ready = lifecycle.Sleeping, true, false })
}

// At daemon start a member adopted asleep is parked already: the member
// adopted awake stays up even if another comes first by id, and the
// sleeping ones are neither started nor parked again (no swap); with only
// sleeping members adopted, the first that starts on its own starts.
func TestGroupAdoptedAsleepMembersStayParked(t *testing.T) {
	t.Run("one awake", func(t *testing.T) {
		h := newHost(t, static, map[string]string{"a": member, "b": member, "c": member})
		m := h.open(nil, nil)
		for _, id := range []string{"a", "b", "c"} {
			h.pool(id).adoptable = true
		}
		asleepNow(h.pool("a"))
		readyNow(h.pool("b"))
		asleepNow(h.pool("c"))
		m.Adopt(context.Background(), func(string) bool { return true })
		for _, id := range []string{"a", "b", "c"} {
			assert.Equal(t, []string{"adopt"}, h.pool(id).Calls(), id)
		}
		assert.Equal(t, lifecycle.Ready, h.pool("b").Snapshot().State)
		assert.Equal(t, lifecycle.Sleeping, h.pool("a").Snapshot().State)
	})
	t.Run("none awake", func(t *testing.T) {
		h := newHost(t, static, map[string]string{"a": member, "b": member})
		m := h.open(nil, nil)
		h.pool("a").adoptable = true
		asleepNow(h.pool("a"))
		m.Adopt(context.Background(), func(string) bool { return true })
		b := h.pool("b")
		require.Eventually(t, func() bool { return b.did("start") }, 5*time.Second, 5*time.Millisecond)
		assert.Equal(t, []string{"adopt"}, h.pool("a").Calls())
	})
}

// A reload that adds a member while another is up parks it, not starts
// it.
func TestGroupReloadDoesNotStartASecondMember(t *testing.T) {
	h := newHost(t, static, map[string]string{"a": member})
	m := h.open(nil, nil)
	readyNow(h.pool("a"))
	h.writePools(map[string]string{"a": member, "b": member})
	require.NoError(t, m.Apply(h.load()))
	b := h.pool("b")
	require.Eventually(t, func() bool { return b.did("park 7s") }, 5*time.Second, 5*time.Millisecond)
	assert.False(t, b.did("start"))
	assert.Empty(t, h.pool("a").Calls())
}

// awakeFake: the fake pool holds its GPU.
func awakeFake(p *fakePool) bool {
	s := p.Snapshot()
	return s.Live || s.State == lifecycle.Ready || s.State == lifecycle.Draining
}

// Many callers at once, for every member: each is answered, and no
// member is made ready while another holds the GPU.
func TestGroupNeverTwoUp(t *testing.T) {
	h := newHost(t, static, map[string]string{"a": member, "b": member, "c": member})
	m := h.open(nil, nil)
	pools := []*fakePool{h.pool("a"), h.pool("b"), h.pool("c")}
	var bad sync.Once
	var twoUp error
	for _, p := range pools {
		p.onReady = func() {
			for _, o := range pools {
				if o != p && awakeFake(o) {
					bad.Do(func() { twoUp = fmt.Errorf("%s made ready while %s is %s", p.cfg.ID, o.cfg.ID, o.Snapshot().State) })
				}
			}
		}
	}
	var wg sync.WaitGroup
	for i := range 30 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			assert.NoError(t, m.EnsureReady(context.Background(), string(rune('a'+i%3)), 0))
		}()
	}
	wg.Wait()
	assert.NoError(t, twoUp)
	assert.LessOrEqual(t, swaps(h), 29.0)
	assert.True(t, strings.Contains(h.logs.String(), "group swap"))
}

// On NVML's inventory a MIG device is on its GPU: a pool on the GPU and
// one on its MIG device outside one group are refused (a reload too),
// naming both files and lines; two MIG devices of one GPU are not shared.
func TestGroupRuleOnNVMLInventory(t *testing.T) {
	nv := nvmlmock.New(dgxh100.New())
	mig, err := nv.AddMIG(0, nvml.GPU_INSTANCE_PROFILE_1_SLICE)
	require.NoError(t, err)
	mig2, err := nv.AddMIG(0, nvml.GPU_INSTANCE_PROFILE_1_SLICE)
	require.NoError(t, err)
	h := newHost(t, func(dir string) string {
		return "[Manager]\nStateDir=" + dir + "/state\nRuntimeDir=" + dir + "/run\nModelsDir=" + dir + "/models\nMetricsTextfile=\n[Inventory]\nBackend=nvml\n"
	}, map[string]string{"a": mig.UUID, "b": mig2.UUID})
	m := h.open(func() gpu.NVML { return gpu.NewNVMLWith(nv.Server) }, nil)
	assert.Equal(t, []string{"a", "b"}, m.IDs())

	h.writePools(map[string]string{"a": mig.UUID, "b": mig2.UUID, "c": nv.GPU(0).UUID})
	err = m.Apply(h.load())
	require.Error(t, err)
	assert.Contains(t, err.Error(), "c.pool:2: [Pool] Devices=: GPU \""+nv.GPU(0).UUID+"\" is "+nv.GPU(0).UUID+", whose MIG device \""+mig.UUID+
		"\" pool \"a\" uses ("+h.dir+"/pools.d/a.pool:2): pools share a GPU only with the same Group=")
	assert.Equal(t, []string{"a", "b"}, m.IDs(), "nothing changed")
}

// A sleeping member (Sleep=vllm) is parked already: asleep its engine
// keeps little of the GPU's memory. Asking for another member starts it
// without parking the sleeper; asking for the sleeper parks the awake one
// first.
func TestASleepingMemberCountsAsParked(t *testing.T) {
	h := newHost(t, static, map[string]string{"a": member, "b": member})
	m := h.open(nil, nil)
	a, b := h.pool("a"), h.pool("b")
	a.set(func(s *supervisor.Snapshot) { s.State, s.Live = lifecycle.Sleeping, true })

	require.NoError(t, m.EnsureReady(context.Background(), "b", 0))
	assert.Equal(t, []string{"ensure"}, b.Calls())
	assert.Equal(t, []string{"park 7s"}, a.Calls(), "the sleeping member's sleep is only confirmed")
	assert.Equal(t, lifecycle.Sleeping, a.Snapshot().State)
	assert.Zero(t, swaps(h))
	assert.NotContains(t, h.logs.String(), `msg="pool parked for another pool of its group" POOL_ID=a`)

	require.NoError(t, m.EnsureReady(context.Background(), "a", 0))
	assert.True(t, b.did("park 7s"), "the awake member is parked for the sleeper: %v", b.Calls())
	assert.Equal(t, []string{"park 7s", "ensure"}, a.Calls())
}

// A member whose engine is still being put to sleep (its Sleep not yet
// answered) still holds the GPU's memory: another member starts only once
// its sleep is confirmed.
func TestAMemberFallingAsleepHoldsTheStartUntilItSleeps(t *testing.T) {
	h := newHost(t, static, map[string]string{"a": member, "b": member})
	m := h.open(nil, nil)
	a, b := h.pool("a"), h.pool("b")
	a.set(func(s *supervisor.Snapshot) { s.State, s.Live = lifecycle.Sleeping, true })
	open := gate(a)
	done := ensure(m, "b")
	require.Eventually(t, func() bool { return a.did("park 7s") }, 5*time.Second, 5*time.Millisecond, "a's sleep is waited for")
	assert.Never(t, func() bool { return b.did("ensure") }, 100*time.Millisecond, 10*time.Millisecond, "b waits for a's sleep")
	close(open)
	require.NoError(t, <-done)
	assert.Equal(t, []string{"ensure"}, b.Calls())
	assert.Equal(t, lifecycle.Sleeping, a.Snapshot().State)
	assert.Zero(t, swaps(h))
}

// Reload of an idle member records its model and starts nothing: it takes
// no turn and parks no member; the model is kept as a drop-in all the
// same.
func TestReloadOfAnIdleMemberParksNobody(t *testing.T) {
	h := newHost(t, static, map[string]string{"a": member, "b": member})
	m := h.open(nil, nil)
	a, b := h.pool("a"), h.pool("b")
	readyNow(a)
	b.set(func(s *supervisor.Snapshot) { s.State = lifecycle.Idle })
	ref := filepath.Join(h.dir, "models", "new.gguf")
	got, err := m.Reload(context.Background(), "b", ref, time.Second)
	require.NoError(t, err)
	assert.Equal(t, ref, got)
	assert.Equal(t, []string{"reload " + ref}, b.Calls())
	assert.False(t, a.did("park 7s"), "the awake member serves on: %v", a.Calls())
	drop, err := os.ReadFile(filepath.Join(h.dir, "pools.d", "b.pool.d", "50-Model.conf"))
	require.NoError(t, err)
	assert.Contains(t, string(drop), "Model="+ref)
}

// The daemon's stop flushes every pool while a group member's loop may be
// reading the manager (its start asks which members sleep): the stop does
// not hold the manager while it waits for that loop.
func TestCloseWhileAPoolReadsTheManager(t *testing.T) {
	h := newHost(t, static, map[string]string{"a": member, "b": member})
	m := h.open(nil, nil)
	a := h.pool("a")
	// The loop reads the manager before it flushes; on a hang the test
	// lets it go, so that it ends.
	release := make(chan struct{})
	a.mu.Lock()
	a.onFlush = func() {
		read := make(chan struct{})
		go func() {
			m.IDs()
			close(read)
		}()
		select {
		case <-read:
		case <-release:
		}
	}
	a.mu.Unlock()
	closed := make(chan struct{})
	go func() {
		m.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		close(release)
		<-closed
		t.Fatal("Close hung on a pool reading the manager")
	}
	assert.True(t, a.did("flush"))
	assert.True(t, h.pool("b").did("flush"))
}
