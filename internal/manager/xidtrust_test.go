//go:build linux && cgo

package manager_test

import (
	"strings"
	"testing"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/gpu/nvmlmock"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/manager"
	"github.com/llorch/pool-managerd/internal/supervisor"
)

const resetScript = "GPUResetCommand=$DIR/reset-gpu %g\n"

// An XID pool-managerd does not know fails closed: the GPU's pools are
// held, not restarted, and nothing is reset, until NVML says the GPU is
// usable.
func TestAnUnknownXIDHoldsThePoolUntilNVMLSaysTheGPUIsUsable(t *testing.T) {
	h, nv := nvmlHost(t, resetScript, map[string]string{"a": "0"}, func(o *manager.Options) {
		o.GPUFirstCheck = 300 * time.Millisecond
	})
	h.script("reset-gpu", `echo "$@" >> `+h.dir+"/resets\n")
	a := h.pool("a")
	uuid := nv.GPU(0).UUID

	nv.SetHealth(0, nvmlmock.Health{RecoveryAction: nvml.GPU_RECOVERY_ACTION_GPU_RESET})
	h.m.RouteXID(uuid, 200)
	require.Len(t, a.gpuCalls(), 1)
	assert.Contains(t, a.gpuCalls()[0], "unhealthy "+uuid+": GPU "+uuid+" is held until NVML reports it usable: Xid 200")
	assert.Equal(t, 1.0, testutil.ToFloat64(h.opts.Metrics.GPUUnhealthy.WithLabelValues(uuid, "hold")))
	assert.Never(t, func() bool { return len(a.gpuCalls()) > 1 }, 500*time.Millisecond, 10*time.Millisecond,
		"held while NVML says the GPU needs a reset")
	nv.SetHealth(0, nvmlmock.Health{})
	require.Eventually(t, func() bool { return len(a.gpuCalls()) == 2 }, 2*time.Second, 10*time.Millisecond)
	assert.Equal(t, "usable "+uuid, a.gpuCalls()[1])
	assert.Empty(t, h.read("resets"), "nothing says a reset helps")
}

// 154 names the driver's recovery action: a reboot of the host holds the
// pools and runs no GPUResetCommand; a GPU reset runs it.
func TestXID154FollowsTheDriversRecoveryAction(t *testing.T) {
	h, nv := nvmlHost(t, resetScript, map[string]string{"a": "0", "b": "1", "c": "2"}, nil)
	h.script("reset-gpu", `echo "$@" >> `+h.dir+"/resets\n")
	a, b, c := h.pool("a"), h.pool("b"), h.pool("c")
	for _, p := range []*fakePool{a, b, c} {
		p.set(func(s *supervisor.Snapshot) { s.State, s.Live = lifecycle.Failed, false })
	}

	nv.SetHealth(0, nvmlmock.Health{RecoveryAction: nvml.GPU_RECOVERY_ACTION_NODE_REBOOT})
	h.m.RouteXID(nv.GPU(0).UUID, 154)
	require.Len(t, a.gpuCalls(), 1)
	assert.Contains(t, a.gpuCalls()[0], "is lost: Xid 154")
	assert.Contains(t, a.gpuCalls()[0], "the driver asks for a reboot of the host")
	assert.Equal(t, 1.0, testutil.ToFloat64(h.opts.Metrics.GPUUnhealthy.WithLabelValues(nv.GPU(0).UUID, "lost")))

	nv.SetHealth(1, nvmlmock.Health{RecoveryAction: nvml.GPU_RECOVERY_ACTION_GPU_RESET})
	h.m.RouteXID(nv.GPU(1).UUID, 154)
	require.Len(t, b.gpuCalls(), 1)
	assert.Contains(t, b.gpuCalls()[0], "needs a reset: Xid 154")
	require.Eventually(t, func() bool { return h.read("resets") != "" }, 2*time.Second, 10*time.Millisecond)
	assert.Never(t, func() bool { return h.read("resets") != nv.GPU(1).UUID+"\n" }, 300*time.Millisecond, 10*time.Millisecond,
		"GPU 1 is reset, GPU 0 (a reboot) is not")

	// No recovery action: the NVLink error's sub-code was one to ignore.
	h.m.RouteXID(nv.GPU(2).UUID, 145)
	assert.Empty(t, c.gpuCalls())
	assert.Contains(t, h.logs.String(), "GPU XID 145 on "+nv.GPU(2).UUID)
}

// 61 is a warning in the journal, not a reset; 159, 167 and 169 reset.
func TestXID61WarnsAnd159167169Reset(t *testing.T) {
	h, nv := nvmlHost(t, "", map[string]string{"a": "0", "b": "1", "c": "2", "d": "3"}, nil)
	a := h.pool("a")
	h.m.RouteXID(nv.GPU(0).UUID, 61)
	assert.Empty(t, a.gpuCalls(), "neither held nor restarted")
	assert.Regexp(t, `level=WARN msg="GPU XID 61 on `+nv.GPU(0).UUID, h.logs.String())
	for i, x := range []uint64{159, 167, 169} {
		p := h.pool(string(rune('b' + i)))
		uuid := nv.GPU(i + 1).UUID
		nv.SetHealth(i+1, nvmlmock.Health{RemapPending: true})
		h.m.RouteXID(uuid, x)
		require.Len(t, p.gpuCalls(), 1, "XID %d", x)
		assert.True(t, strings.HasPrefix(p.gpuCalls()[0], "unhealthy "+uuid+": GPU "+uuid+" needs a reset"), p.gpuCalls()[0])
	}
}
