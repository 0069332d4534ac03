package bus_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/bus"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
)

// wakes reads pool_managerd_wakes_total{result} off the metrics textfile
// (-1: not there).
func wakes(t *testing.T, dir, result string) float64 {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "metrics", "pool-managerd.prom"))
	if err != nil {
		return -1
	}
	m := regexp.MustCompile(`(?m)^pool_managerd_wakes_total\{pool_id="llama-8b",result="` + result + `"\} (\S+)$`).FindSubmatch(b)
	if m == nil {
		return -1
	}
	v, err := strconv.ParseFloat(string(m[1]), 64)
	require.NoError(t, err)
	return v
}

// simGet reads one of the simulator's JSON endpoints.
func simGet(t *testing.T, port int, path string) map[string]any {
	t.Helper()
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d%s", port, path))
	require.NoError(t, err)
	defer resp.Body.Close()
	out := map[string]any{}
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&out))
	return out
}

// A vLLM pool with Sleep=vllm sleeps when unused: its engine runs on (same
// pid, scope active) with its GPU memory given back; a lease wakes it and
// is granted on the same engine. A wake that fails is no crash: a fresh
// engine serves the caller.
func TestSleepingPoolWakesOnLease(t *testing.T) {
	dir, port := configure(t)
	vllmModel(t, dir)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", "llama-8b.pool"), []byte(fmt.Sprintf(`[Pool]
Devices=0
Model=tiny
Slots=2
IdleStopSec=2
StartOnLease=yes
[Engine]
ExecStart=%s --engine vllm --model %%m --port %%p --enable-sleep-mode --gpu-mem-mb 8
Port=%d
StopTimeoutSec=2
Version=sim-1
Sleep=vllm
SleepLevel=1
[Health]
IntervalSec=0.2
TimeoutSec=0.2
WarmupRequest=POST /v1/completions {"prompt":"Hi","max_tokens":1}
[Restart]
BackoffInitialSec=0.2
`, os.Getenv(sandbox.BinEnv("pool-engine-sim")), port)), 0o644))
	begin := time.Now()
	start(t, dir)
	waitProp(t, "llama-8b", "Ready", "b true")
	pid := getProp(t, "llama-8b", "MainPID")
	assert.Equal(t, float64(8<<20), simGet(t, port, "/sim/memory")["gpu_mem_bytes"])

	waitProp(t, "llama-8b", "State", `s "sleeping"`)
	assert.Equal(t, "b false", getProp(t, "llama-8b", "Ready"))
	assert.Equal(t, "b true", getProp(t, "llama-8b", "Live"))
	assert.Equal(t, pid, getProp(t, "llama-8b", "MainPID"), "the engine sleeps, it is not stopped")
	assert.Equal(t, "u 0", getProp(t, "llama-8b", "CrashCount"))
	v := getProp(t, "llama-8b", "IdleSinceUSec")
	us, err := strconv.ParseUint(v[2:], 10, 64)
	require.NoError(t, err, v)
	assert.True(t, time.UnixMicro(int64(us)).After(begin), "IdleSinceUSec %s", v)
	out, _ := try("systemctl", "is-active", "pool-engine-llama\\x2d8b.scope")
	assert.Equal(t, "active", out)
	require.Eventually(t, func() bool { return simGet(t, port, "/is_sleeping")["is_sleeping"] == true }, 5*time.Second, 20*time.Millisecond)
	assert.Equal(t, float64(0), simGet(t, port, "/sim/memory")["gpu_mem_bytes"], "asleep, its GPU memory is given back")
	// Asleep it is probed and stays up: no health failure, no canary.
	time.Sleep(time.Second)
	assert.Equal(t, `s "sleeping"`, getProp(t, "llama-8b", "State"))

	router, err := dbus.ConnectSystemBus()
	require.NoError(t, err)
	defer router.Close()
	obj := router.Object(bus.Name, mgr)
	var lease string
	require.NoError(t, obj.Call(bus.ManagerIface+".AcquireLease", 0, "llama-8b").Store(&lease))
	assert.Regexp(t, `^llama-8b/[0-9a-f]{32}$`, lease)
	assert.Equal(t, `s "ready"`, getProp(t, "llama-8b", "State"))
	assert.Equal(t, pid, getProp(t, "llama-8b", "MainPID"), "the same engine serves")
	assert.Equal(t, false, simGet(t, port, "/is_sleeping")["is_sleeping"])
	assert.Equal(t, float64(8<<20), simGet(t, port, "/sim/memory")["gpu_mem_bytes"])
	require.Eventually(t, func() bool { return wakes(t, dir, "ok") == 1 }, 10*time.Second, 50*time.Millisecond)
	assert.Contains(t, sh(t, "journalctl", "-u", "pool-managerd.service", "--no-pager", "-o", "verbose",
		"MESSAGE=engine awake and ready"), "DURATION_SEC=")

	// A wake the engine refuses: the pool replaces it, no crash counted.
	require.NoError(t, obj.Call(bus.ManagerIface+".ReleaseLease", 0, lease).Err)
	waitProp(t, "llama-8b", "State", `s "sleeping"`)
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Post(fmt.Sprintf("http://127.0.0.1:%d/sim/fault?kind=wake-fail", port), "", nil)
	require.NoError(t, err)
	resp.Body.Close()
	out, err = call("EnsureReady", "st", "llama-8b", "30000")
	require.NoError(t, err, out)
	assert.Equal(t, `s "ready"`, getProp(t, "llama-8b", "State"))
	assert.NotEqual(t, pid, getProp(t, "llama-8b", "MainPID"), "a fresh engine")
	assert.Equal(t, "u 0", getProp(t, "llama-8b", "CrashCount"))
	assert.True(t, strings.Contains(getProp(t, "llama-8b", "LastError"), "wake failed"), getProp(t, "llama-8b", "LastError"))
	require.Eventually(t, func() bool { return wakes(t, dir, "failed") == 1 }, 10*time.Second, 50*time.Millisecond)
}

// vllmModel makes the vLLM simulator's model directory "tiny" in dir's
// models (a Hugging Face config and one weights file) and returns its
// path.
func vllmModel(t *testing.T, dir string) string {
	t.Helper()
	model := filepath.Join(dir, "models", "tiny")
	require.NoError(t, os.Mkdir(model, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(model, "config.json"),
		[]byte(`{"architectures":["LlamaForCausalLM"],"model_type":"llama","max_position_embeddings":2048}`), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(model, "model.safetensors"), make([]byte, 64<<10), 0o644))
	return model
}
