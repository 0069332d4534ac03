package supervisor_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/crash"
	"github.com/llorch/pool-managerd/internal/health"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	. "github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// vllmModel writes a model directory in Hugging Face layout, as the
// simulator's vLLM mode loads it, under the environment's models.
func vllmModel(t *testing.T, e *testpool.Env, name string) string {
	t.Helper()
	dir := filepath.Join(e.Dir, "models", name)
	require.NoError(t, os.Mkdir(dir, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "config.json"),
		[]byte(`{"architectures":["LlamaForCausalLM"],"model_type":"llama","max_position_embeddings":2048}`), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "model.safetensors"), make([]byte, 64<<10), 0o644))
	return dir
}

// canaryHealth sends a one-token completion to an engine idle for 0.5 s.
const canaryHealth = "[Health]\nCanaryRequest=POST /v1/completions {\"prompt\":\"Hi\",\"max_tokens\":1}\nCanaryIdleSec=0.5\nCanaryTimeoutSec=2\n"

// vLLM's engine core dies while its API server stays and /health keeps
// answering 200: only a request that must generate finds it. The canary
// does, and the pool is restarted as unhealthy.
func TestCanaryFindsADeadEngineCoreBehindAGoodHealth(t *testing.T) {
	for _, progress := range []bool{false, true} {
		name := "without-metrics"
		extra := canaryHealth
		if progress {
			name = "with-metrics"
			extra += "ProgressURL=http://127.0.0.1:%p/metrics\nStallSec=5\n"
		}
		t.Run(name, func(t *testing.T) {
			e := testpool.New(t, nil)
			s := e.Start(testpool.Spec{ID: "canary" + map[bool]string{false: "a", true: "b"}[progress], Devices: "0",
				SimArgs: "--engine vllm", Model: vllmModel(t, e, "tiny"), Extra: extra})
			first := waitFor(t, s, "ready", ready(1))
			// Idle long enough for good canaries first: they stop nothing.
			time.Sleep(1500 * time.Millisecond)
			require.Zero(t, s.Snapshot().Policy.CrashCount)
			_, tokens, err := health.Progress(e.Ctx, fmt.Sprintf("http://127.0.0.1:%d/metrics", s.Port), time.Second, nil)
			require.NoError(t, err)
			assert.Positive(t, tokens, "only canaries generated")
			require.NoError(t, s.Fault("child-exit"))
			crashed := waitFor(t, s, "the crash", func(s Snapshot) bool { return s.Policy.CrashCount == 1 })
			assert.Equal(t, crash.HealthCheck, crashed.LastReason)
			assert.Contains(t, crashed.LastError, "health check failed 3 times (canary request failed: ")
			assert.Contains(t, crashed.LastError, "answered 500")
			again := waitFor(t, s, "ready again", ready(2))
			assert.NotEqual(t, first.MainPID, again.MainPID)
		})
	}
}

// A decoder that hangs with /health still answering: without metrics no
// stall check sees it; the canary gets no answer within its timeout.
func TestCanaryFindsAHungDecoder(t *testing.T) {
	e := testpool.New(t, nil)
	s := e.Start(testpool.Spec{ID: "canaryhang", Devices: "0", SimArgs: "--engine vllm", Model: vllmModel(t, e, "tiny"),
		Extra: strings.Replace(canaryHealth, "CanaryTimeoutSec=2", "CanaryTimeoutSec=0.5", 1)})
	waitFor(t, s, "ready", ready(1))
	require.NoError(t, s.Fault("stall"))
	crashed := waitFor(t, s, "the crash", func(s Snapshot) bool { return s.Policy.CrashCount == 1 })
	assert.Equal(t, crash.HealthCheck, crashed.LastReason)
	assert.Contains(t, crashed.LastError, "health check failed 3 times (canary request failed: ")
	waitFor(t, s, "ready again", ready(2))
}

// The vLLM engine-core faults that show otherwise: /health answering 503,
// an OOM kill of the engine core (the API server then exits 1), the API
// server exiting with it.
func TestVLLMEngineCoreFaults(t *testing.T) {
	cases := []struct {
		name, fault, simArgs, extra string
		reason                      crash.Reason
		errHas                      string
	}{
		{"dead-health-503", "child-exit", "--dead-health-status 503", "", crash.HealthCheck, "health check failed 3 times"},
		{"child-oom", "child-oom", "--gpu-mem-mb 16", "[Scope]\nMemoryMax=64M\n", crash.OutOfMemory, "out of memory"},
		{"server-exits", "child-exit-server-exits", "", "", crash.ExitCode, "exited with status 1"},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := testpool.New(t, nil)
			s := e.Start(testpool.Spec{ID: "vcore" + string(rune('a'+i)), Devices: "0",
				SimArgs: "--engine vllm " + c.simArgs, Model: vllmModel(t, e, "tiny"), Extra: c.extra})
			first := waitFor(t, s, "ready", ready(1))
			require.NoError(t, s.Fault(c.fault))
			crashed := waitFor(t, s, "the crash", func(s Snapshot) bool { return s.Policy.CrashCount == 1 })
			assert.Equal(t, c.reason, crashed.LastReason)
			assert.Contains(t, crashed.LastError, c.errHas)
			again := waitFor(t, s, "ready again", ready(2))
			assert.NotEqual(t, first.MainPID, again.MainPID)
		})
	}
}

// isSleeping asks the simulator's vLLM whether it sleeps.
func isSleeping(t *testing.T, port int) bool {
	t.Helper()
	var out struct {
		IsSleeping bool `json:"is_sleeping"`
	}
	get(t, port, "/is_sleeping", &out)
	return out.IsSleeping
}

// An engine its runtime record says was left asleep is adopted asleep, as
// after a daemon restart: the same process, not woken, until its next
// use. A record naming another process, or one whose word on sleep is
// garbled (set aside), is no such word: the engine is woken before it
// serves, as one without a record.
func TestAnEngineRecordedAsleepIsAdoptedAsleep(t *testing.T) {
	for _, c := range []struct {
		name   string
		edit   func(string) string
		asleep bool
	}{
		{"recorded", func(s string) string { return s }, true},
		{"another pid", func(s string) string {
			return regexp.MustCompile(`"pid": \d+`).ReplaceAllString(s, `"pid": 1`)
		}, false},
		{"garbled", func(s string) string { return strings.Replace(s, `"asleep": {`, `"asleep": 5, "was": {`, 1) }, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := testpool.New(t, nil)
			id := "asleep" + strings.ReplaceAll(c.name, " ", "")
			spec := testpool.Spec{ID: id, Devices: "0", SimArgs: "--engine vllm --enable-sleep-mode --gpu-mem-mb 8",
				Model: vllmModel(t, e, "tiny"), Engine: "Version=sim-1\nStopTimeoutSec=2\nSleep=vllm\nSleepLevel=1\n",
				Extra: "[Pool]\nIdleStopSec=2\n"}
			s := e.Start(spec)
			first := waitFor(t, s, "asleep", func(p Snapshot) bool { return p.State == lifecycle.Sleeping })
			rec := filepath.Join(e.Dir, "run", "pools", id+".json")
			var text string
			require.Eventually(t, func() bool {
				b, _ := os.ReadFile(rec)
				text = string(b)
				return strings.Contains(text, `"asleep": {`)
			}, 5*time.Second, 10*time.Millisecond, "the record says it sleeps")
			require.True(t, isSleeping(t, s.Port))
			require.NoError(t, os.WriteFile(rec, []byte(c.edit(text)), 0o644))

			// A second supervisor of the pool, as after a daemon restart.
			spec.NoStart, spec.Port = true, s.Port
			again := e.Start(spec)
			ctx, cancel := context.WithTimeout(e.Ctx, 20*time.Second)
			defer cancel()
			adopted, err := again.Adopt(ctx, func(string) bool { return true })
			require.NoError(t, err)
			require.True(t, adopted)
			if !c.asleep {
				snap := waitFor(t, again, "ready", func(p Snapshot) bool { return p.Ready })
				assert.Equal(t, first.MainPID, snap.MainPID)
				assert.False(t, isSleeping(t, s.Port), "woken before it serves")
				return
			}
			snap := again.Snapshot()
			assert.Equal(t, lifecycle.Sleeping, snap.State)
			assert.Equal(t, first.MainPID, snap.MainPID)
			assert.Equal(t, first.IdleSince.UnixMicro(), snap.IdleSince.UnixMicro())
			time.Sleep(time.Second)
			assert.Equal(t, lifecycle.Sleeping, again.Snapshot().State, "probed, it sleeps on")
			assert.True(t, isSleeping(t, s.Port), "not woken")
			require.NoError(t, again.EnsureReady(ctx, 0))
			assert.Equal(t, first.MainPID, again.Snapshot().MainPID, "the same engine serves")
			assert.False(t, isSleeping(t, s.Port))
			b, err := os.ReadFile(rec)
			require.NoError(t, err)
			assert.NotContains(t, string(b), `"asleep"`, "recorded awake")
		})
	}
}
