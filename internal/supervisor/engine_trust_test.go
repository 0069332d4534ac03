package supervisor_test

import (
	"fmt"
	"net/http"
	"net/url"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/crash"
	. "github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// fault posts a simulator fault with a deadline: a fault that blocks the
// engine must fail the test, not hang it.
func fault(t *testing.T, p *testpool.Pool, kind string) {
	t.Helper()
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Post(fmt.Sprintf("http://127.0.0.1:%d/sim/fault?kind=%s", p.Port, url.QueryEscape(kind)), "", nil)
	require.NoError(t, err, "fault %s", kind)
	resp.Body.Close()
	require.Equal(t, http.StatusAccepted, resp.StatusCode, "fault %s", kind)
}

// scopeLog waits until the pool's scope has logged want and returns the
// scope's log.
func scopeLog(t *testing.T, unit, want string) string {
	t.Helper()
	var out []byte
	require.Eventually(t, func() bool {
		out, _ = exec.Command("journalctl", "-u", unit, "--no-pager", "-o", "cat").Output()
		return strings.Contains(string(out), want)
	}, 20*time.Second, 100*time.Millisecond, "journalctl -u %s shows %q", unit, want)
	return string(out)
}

func healthy(t *testing.T, p *testpool.Pool) {
	t.Helper()
	c := &http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d/health", p.Port))
	require.NoError(t, err, "the engine answers /health")
	resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode)
}

// A prompt that says "CUDA error", logged by the engine with its request,
// does not restart the pool; the engine's own CUDA error still does.
func TestPromptSayingCUDAErrorDoesNotRestartThePool(t *testing.T) {
	e := testpool.New(t, nil)
	s := e.Pool("prompted", "0", "", "")
	first := waitFor(t, s, "ready", ready(1))
	for _, prompt := range []string{
		`{"prompt":"CUDA error: out of memory"}`,
		`RuntimeError: CUDA error: an illegal memory access was encountered`,
		`x.cu:75: CUDA error`,
	} {
		fault(t, s, "log:"+prompt)
		scopeLog(t, first.Unit, "srv  log_server_r: request:  "+prompt)
	}
	// The shim reports faults in the order of the output and the first
	// one ends the engine: had a prompt counted, the crash below would
	// quote it, not the engine's own error.
	require.NoError(t, s.Fault("cuda"))
	crashed := waitFor(t, s, "the CUDA crash", func(p Snapshot) bool { return p.Policy.CrashCount == 1 })
	assert.Equal(t, crash.CUDAError, crashed.LastReason)
	assert.Contains(t, crashed.LastError, `GPU fault: "CUDA error: an illegal memory access was encountered"`,
		"the engine's own error, not a prompt, ended the first engine")
	again := waitFor(t, s, "ready again", ready(2))
	assert.Equal(t, uint64(1), again.Policy.CrashCount, "no crash for the prompts")
	assert.NotEqual(t, first.MainPID, again.MainPID)
}

// A 4 MiB output line reaches the journal in pieces; the engine goes on
// answering and logging, and a CUDA error after it is still seen.
func TestLongOutputLineNeitherBlocksTheEngineNorBlindsTheScan(t *testing.T) {
	const size = 4 << 20
	e := testpool.New(t, nil)
	s := e.Pool("verbose", "0", "", "")
	first := waitFor(t, s, "ready", ready(1))
	fault(t, s, fmt.Sprintf("long-line:%d", size))
	healthy(t, s)
	fault(t, s, "log:marker after the long line")
	out := scopeLog(t, first.Unit, "marker after the long line")

	pieces, longest := 0, 0
	for l := range strings.SplitSeq(out, "\n") {
		if l != "" && strings.Trim(l, "abcdefghijklmnopqrstuvwxyz") == "" {
			pieces += len(l)
			longest = max(longest, len(l))
		}
	}
	assert.Equal(t, size, pieces, "the whole line is in the journal")
	assert.LessOrEqual(t, longest, 48<<10, "in pieces of journald's LineMax")
	healthy(t, s)
	snap := s.Snapshot()
	assert.Zero(t, snap.Policy.CrashCount)
	assert.True(t, snap.Ready)

	require.NoError(t, s.Fault("cuda"))
	crashed := waitFor(t, s, "the CUDA crash", func(p Snapshot) bool { return p.Policy.CrashCount == 1 })
	assert.Equal(t, crash.CUDAError, crashed.LastReason)
}
