//go:build linux && cgo

package manager_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh100"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/gpu"
	"github.com/llorch/pool-managerd/internal/gpu/nvmlmock"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/manager"
	"github.com/llorch/pool-managerd/internal/supervisor"
)

// nvmlHost is a manager on an 8-GPU DGX H100 from go-nvml's mocks, asking
// about held GPUs every 20 ms; inventory is added to [Inventory].
func nvmlHost(t *testing.T, inventory string, pools map[string]string, tune func(*manager.Options)) (*host, *nvmlmock.Host) {
	t.Helper()
	nv := nvmlmock.New(dgxh100.New())
	h := newHost(t, func(dir string) string {
		return `[Manager]
StateDir=` + dir + `/state
RuntimeDir=` + dir + `/run
ModelsDir=` + dir + `/models
MetricsTextfile=
[Inventory]
Backend=nvml
` + strings.ReplaceAll(inventory, "$DIR", dir)
	}, pools)
	h.open(func() gpu.NVML { return gpu.NewNVMLWith(nv.Server) }, func(o *manager.Options) {
		o.GPUFirstCheck, o.GPUCheckEvery = 20*time.Millisecond, 20*time.Millisecond
		if tune != nil {
			tune(o)
		}
	})
	return h, nv
}

// script writes an executable shell script into the host's directory.
func (h *host) script(name, body string) {
	h.t.Helper()
	require.NoError(h.t, os.WriteFile(filepath.Join(h.dir, name), []byte("#!/bin/sh\n"+body), 0o755))
}

func (h *host) read(name string) string {
	b, _ := os.ReadFile(filepath.Join(h.dir, name))
	return string(b)
}

// A pool that cannot be set up (a GPU NVML does not have) refuses the
// whole reload: every pool runs on as it was, the pools built for it end.
func TestApplyRefusedChangesNothing(t *testing.T) {
	h, _ := nvmlHost(t, "", map[string]string{"a": "0", "b": "1"}, nil)
	m := h.m
	before := m.Config()
	a, b := h.pool("a"), h.pool("b")

	// a changed, c added, e on a GPU the host lacks.
	h.writePools(map[string]string{"a": "0;[Pool];Slots=5", "b": "1", "c": "2", "e": "9"})
	err := m.Apply(h.load())
	require.Error(t, err)
	assert.Contains(t, err.Error(), "pool e")
	assert.Equal(t, []string{"a", "b"}, m.IDs())
	assert.Same(t, a, h.pool("a"))
	assert.Same(t, b, h.pool("b"))
	assert.Same(t, before, m.Config())
	for _, p := range []*fakePool{a, b} {
		assert.Empty(t, p.Calls(), "pool %s untouched", p.cfg.ID)
		assert.True(t, p.running())
	}
	assert.Empty(t, h.pub.Calls(), "nothing published")
	for _, p := range h.Built()[2:] {
		require.Eventually(t, func() bool { return !p.running() }, time.Second, 5*time.Millisecond, "a pool built for the reload ends")
		assert.Empty(t, p.Calls(), "never started")
	}
}

// An XID that needs a reset holds the GPU's pools; GPUResetCommand runs
// with the GPU's UUID once no pool on it runs an engine, and once only;
// the hold lasts while NVML says the GPU needs a reset, and is lifted
// when it is usable again.
func TestGPUHeldForAResetUntilUsable(t *testing.T) {
	h, nv := nvmlHost(t, "GPUResetCommand=$DIR/reset-gpu --gpu %g\n", map[string]string{"a": "0", "b": "1"}, nil)
	h.script("reset-gpu", `echo "$@" >> `+h.dir+"/resets\necho reset done\n")
	a, b := h.pool("a"), h.pool("b")
	uuid := nv.GPU(0).UUID
	a.set(func(s *supervisor.Snapshot) { s.State, s.Live = lifecycle.Ready, true })

	nv.SetHealth(0, nvmlmock.Health{RemapPending: true})
	h.m.RouteXID(uuid, 48) // double-bit ECC
	require.Len(t, a.gpuCalls(), 1)
	assert.Contains(t, a.gpuCalls()[0], "unhealthy "+uuid+": GPU "+uuid+" needs a reset: Xid 48")
	assert.Empty(t, b.gpuCalls(), "the other GPU's pool is untouched")
	gauge := h.opts.Metrics.GPUUnhealthy
	assert.Equal(t, 1.0, testutil.ToFloat64(gauge.WithLabelValues(uuid, "reset")))
	assert.Contains(t, h.logs.String(), "its pools are held, not restarted")

	assert.Never(t, func() bool { return h.read("resets") != "" }, 200*time.Millisecond, 10*time.Millisecond,
		"no reset while the pool's engine runs")
	a.set(func(s *supervisor.Snapshot) { s.State, s.Live = lifecycle.Failed, false })
	require.Eventually(t, func() bool { return h.read("resets") != "" }, 2*time.Second, 10*time.Millisecond)
	assert.Equal(t, "--gpu "+uuid+"\n", h.read("resets"), "%g is the GPU's UUID")
	require.Eventually(t, func() bool {
		return strings.Contains(h.logs.String(), "GPUResetCommand ran: "+h.dir+"/reset-gpu --gpu "+uuid)
	}, time.Second, 10*time.Millisecond)
	assert.Regexp(t, `OUTPUT="[^"]*reset done"`, h.logs.String(), "its output is journaled")

	// Another XID while held says so again, and resets nothing more.
	h.m.RouteXID(uuid, 48)
	assert.Len(t, a.gpuCalls(), 2)
	assert.Never(t, func() bool { return len(a.gpuCalls()) > 2 }, 200*time.Millisecond, 10*time.Millisecond,
		"held while NVML says a reset is pending")
	assert.Equal(t, "--gpu "+uuid+"\n", h.read("resets"), "one reset")

	nv.SetHealth(0, nvmlmock.Health{})
	require.Eventually(t, func() bool { return len(a.gpuCalls()) == 3 }, 2*time.Second, 10*time.Millisecond)
	assert.Equal(t, "usable "+uuid, a.gpuCalls()[2], "the hold is lifted")
	assert.Equal(t, 0, testutil.CollectAndCount(gauge))
	assert.Contains(t, h.logs.String(), "GPU "+uuid+" is usable again")
	assert.Empty(t, b.gpuCalls())
}

// A failing GPUResetCommand is journaled with its error and output, the
// hold lasting until the GPU is usable; without %g the UUID is the last
// argument. A lost GPU is not reset, nor one a pool's engine does not
// leave within GPUResetWait.
func TestGPUResetCommandFailureAndLimits(t *testing.T) {
	h, nv := nvmlHost(t, "GPUResetCommand=$DIR/reset-gpu -r\n", map[string]string{"a": "0", "b": "1", "c": "2"},
		func(o *manager.Options) { o.GPUResetWait = 300 * time.Millisecond })
	h.script("reset-gpu", `echo "$@" >> `+h.dir+"/resets\necho 'no such GPU'\nexit 3\n")
	a, b, c := h.pool("a"), h.pool("b"), h.pool("c")

	nv.SetHealth(0, nvmlmock.Health{RemapPending: true})
	h.m.RouteXID(nv.GPU(0).UUID, 48)
	require.Eventually(t, func() bool { return strings.Contains(h.logs.String(), "GPUResetCommand failed") }, 2*time.Second, 10*time.Millisecond)
	assert.Equal(t, "-r "+nv.GPU(0).UUID+"\n", h.read("resets"), "the UUID is the last argument")
	assert.Contains(t, h.logs.String(), `msg="GPUResetCommand failed: `+h.dir+"/reset-gpu -r "+nv.GPU(0).UUID+`"`)
	assert.Regexp(t, `ERROR="exit status 3" OUTPUT="[^"]*no such GPU"`, h.logs.String())
	assert.Len(t, a.gpuCalls(), 1, "still held")
	nv.SetHealth(0, nvmlmock.Health{})
	require.Eventually(t, func() bool { return len(a.gpuCalls()) == 2 }, 2*time.Second, 10*time.Millisecond)
	assert.Equal(t, "usable "+nv.GPU(0).UUID, a.gpuCalls()[1])

	// Lost (79): no reset can help.
	nv.SetHealth(1, nvmlmock.Health{Lost: true})
	h.m.RouteXID(nv.GPU(1).UUID, 79)
	assert.Len(t, b.gpuCalls(), 1)

	// A pool's engine that does not leave the GPU.
	c.set(func(s *supervisor.Snapshot) { s.Live = true })
	nv.SetHealth(2, nvmlmock.Health{RemapPending: true})
	h.m.RouteXID(nv.GPU(2).UUID, 48)
	require.Eventually(t, func() bool {
		return strings.Contains(h.logs.String(), "GPUResetCommand not run: a pool still runs an engine on the GPU")
	}, 2*time.Second, 10*time.Millisecond)
	assert.Contains(t, h.logs.String(), "POOL_ID=c")
	assert.Equal(t, "-r "+nv.GPU(0).UUID+"\n", h.read("resets"), "run for GPU 0 alone")
}

// WatchXID watches the GPUs of the pools configured now, again after a
// reload, and routes their events.
func TestWatchXIDFollowsTheConfiguration(t *testing.T) {
	h, nv := nvmlHost(t, "", map[string]string{"a": "0", "b": "1"}, nil)
	ctx := t.Context()
	go h.m.WatchXID(ctx)
	require.Eventually(t, func() bool { return len(nv.Stats().Registered) == 2 }, 5*time.Second, 10*time.Millisecond)
	assert.Equal(t, []string{nv.GPU(0).UUID, nv.GPU(1).UUID}, nv.Stats().Registered)
	require.NoError(t, nv.XID(0, 94, ^uint32(0), ^uint32(0)))
	a := h.pool("a")
	require.Eventually(t, func() bool { return len(a.gpuCalls()) == 1 }, 5*time.Second, 10*time.Millisecond)
	assert.Equal(t, "xid 94 "+nv.GPU(0).UUID, a.gpuCalls()[0])
	assert.Empty(t, h.pool("b").gpuCalls())

	h.writePools(map[string]string{"a": "2", "b": "1"})
	require.NoError(t, h.m.Apply(h.load()))
	require.Eventually(t, func() bool {
		r := nv.Stats().Registered
		return len(r) == 2 && r[0] == nv.GPU(1).UUID && r[1] == nv.GPU(2).UUID
	}, 5*time.Second, 10*time.Millisecond, "the reload's GPUs are watched")
	require.NoError(t, nv.XID(2, 94, ^uint32(0), ^uint32(0)))
	na := h.pool("a")
	require.Eventually(t, func() bool { return len(na.gpuCalls()) == 1 }, 5*time.Second, 10*time.Millisecond)
	assert.Equal(t, "xid 94 "+nv.GPU(2).UUID, na.gpuCalls()[0])
}
