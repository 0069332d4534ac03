package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/crash"
)

const minimalPool = `[Pool]
Devices=0
Model=/models/m.gguf
[Engine]
ExecStart=/usr/bin/llama-server --model %m --port %p
Port=8081
`

// writeDir lays out a configuration directory from file name -> content.
func writeDir(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(dir, PoolsDir), 0o755))
	for name, content := range files {
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644))
	}
	return dir
}

func TestGPUResetCommand(t *testing.T) {
	dir := writeDir(t, map[string]string{"pool-managerd.conf": "[Inventory]\nGPUResetCommand=/usr/bin/nvidia-smi -r -i %g\n"})
	c, err := Load(dir)
	require.NoError(t, err)
	assert.Equal(t, []string{"/usr/bin/nvidia-smi", "-r", "-i", "%g"}, c.Manager.Inventory.GPUResetCommand)
	dir = writeDir(t, map[string]string{"pool-managerd.conf": "[Inventory]\nGPUResetCommand=nvidia-smi -r\n"})
	_, err = Load(dir)
	assert.ErrorContains(t, err, "[Inventory] GPUResetCommand=: \"nvidia-smi\": the command must be an absolute path")
}

// Serving health: stall detection and a warm-up request, as a
// llama-server pool file sets them.
func TestServingHealthKeys(t *testing.T) {
	dir := writeDir(t, map[string]string{"pools.d/a.pool": minimalPool + `[Health]
ProgressURL=http://127.0.0.1:%p/metrics
StallSec=60
WarmupRequest=POST /completion {"prompt":"Hi","n_predict":1}
WarmupTimeoutSec=30
`})
	c, err := Load(dir)
	require.NoError(t, err)
	h := c.Pools[0].Health
	assert.Equal(t, "http://127.0.0.1:8081/metrics", c.Pools[0].Specifiers("").Expand(h.ProgressURL))
	assert.Equal(t, 60*time.Second, h.Stall)
	assert.Equal(t, &WarmupRequest{Method: "POST", Path: "/completion", Body: `{"prompt":"Hi","n_predict":1}`}, h.Warmup)
	assert.Equal(t, 30*time.Second, h.WarmupTimeout)
}

// The canary: WarmupRequest='s syntax, an idle time it needs, an optional
// timeout (unset: the check's default).
func TestCanaryKeys(t *testing.T) {
	dir := writeDir(t, map[string]string{"pools.d/a.pool": minimalPool + `[Health]
CanaryRequest=POST /v1/completions {"prompt":"Hi","max_tokens":1}
CanaryIdleSec=45
`, "pools.d/b.pool": strings.NewReplacer("Devices=0", "Devices=1", "8081", "8082").Replace(minimalPool) + `[Health]
CanaryRequest=GET /v1/models
CanaryIdleSec=10
CanaryTimeoutSec=5
`})
	c, err := Load(dir)
	require.NoError(t, err)
	require.Len(t, c.Pools, 2)
	h := c.Pools[0].Health
	assert.Equal(t, &WarmupRequest{Method: "POST", Path: "/v1/completions", Body: `{"prompt":"Hi","max_tokens":1}`}, h.Canary)
	assert.Equal(t, 45*time.Second, h.CanaryIdle)
	assert.Zero(t, h.CanaryTimeout)
	h = c.Pools[1].Health
	assert.Equal(t, &WarmupRequest{Method: "GET", Path: "/v1/models"}, h.Canary)
	assert.Equal(t, 10*time.Second, h.CanaryIdle)
	assert.Equal(t, 5*time.Second, h.CanaryTimeout)
}

func TestLoadExample(t *testing.T) {
	c, err := Load("../../packaging/examples")
	require.NoError(t, err)
	require.Len(t, c.Pools, 2)
	p := c.Pools[1]
	assert.Equal(t, "llama8b", p.ID)
	assert.Equal(t, []string{"0", "1"}, p.Devices)
	assert.Equal(t, "/var/lib/models/llama-3-8b-q4.gguf", p.Model)
	assert.Equal(t, uint32(4), p.Slots)
	assert.Equal(t, 8081, p.Engine.Port)
	assert.Empty(t, p.Engine.User, "a user of the pool's own")
	assert.Equal(t, []string{"LLAMA_ARG_CTX_SIZE=8192"}, p.Engine.Environment)
	assert.Equal(t, 30*time.Second, p.Engine.StopTimeout)
	assert.Equal(t, "b4567", p.Engine.Version)
	assert.Equal(t, Health{Interval: 5 * time.Second, Timeout: 2 * time.Second, FailureThreshold: 3, StartTimeout: 120 * time.Second, WarmupTimeout: 60 * time.Second}, p.Health)
	assert.Equal(t, 500*time.Millisecond, p.Restart.Backoff.Min)
	assert.Equal(t, map[crash.Reason]float64{crash.CUDAError: 2}, p.Restart.Backoff.Multiplier)
	require.Len(t, p.Scope, 2)
	assert.Equal(t, ScopeProperty{Key: "MemoryMax", Raw: "64G", Name: "MemoryMax", Value: uint64(64 << 30)}, p.Scope[0])
	assert.Equal(t, ScopeProperty{Key: "CPUWeight", Raw: "200", Name: "CPUWeight", Value: uint64(200)}, p.Scope[1])

	sp := p.Specifiers("/staged/m.gguf")
	argv := make([]string, len(p.Engine.ExecStart))
	for i, a := range p.Engine.ExecStart {
		argv[i] = sp.Expand(a)
	}
	assert.Equal(t, []string{"/usr/bin/llama-server", "--model", "/staged/m.gguf", "--port", "8081", "--host", "127.0.0.1", "-ngl", "99"}, argv)
	assert.Equal(t, "http://127.0.0.1:8081/health", sp.Expand(p.Engine.HealthURL))

	m := c.Manager
	assert.Equal(t, BackendAuto, m.Inventory.Backend)
	assert.Equal(t, StaticDevice{Index: 1, UUID: "GPU-8f2c1a70-0000-4000-8000-000000000001", Node: "/dev/nvidia1"}, m.Inventory.Devices[1])
	assert.Equal(t, []string{"/dev/nvidiactl", "/dev/nvidia-uvm"}, m.Inventory.ControlDevices)
}

func TestDefaults(t *testing.T) {
	dir := writeDir(t, map[string]string{"pools.d/a.pool": minimalPool})
	c, err := Load(dir)
	require.NoError(t, err)
	assert.Equal(t, DefaultManager(), c.Manager)
	p := c.Pools[0]
	assert.True(t, p.AutoStart)
	assert.Empty(t, p.Engine.User, "without User=, a user of the pool's own")
	assert.Equal(t, UIDRange{First: 65536, Last: 99999}, c.Manager.EngineUIDs)
	assert.Equal(t, "http://127.0.0.1:%p/health", p.Engine.HealthURL)
	assert.Equal(t, time.Second, p.Restart.Backoff.Initial)
	assert.Equal(t, 60*time.Second, p.Restart.Backoff.Max)
	assert.Equal(t, float64(10), p.Restart.Backoff.JitterPercent)
	assert.Equal(t, 300*time.Second, p.Restart.Backoff.Stable)
	assert.Equal(t, 5, p.Restart.Breaker.Threshold)
	assert.Equal(t, 300*time.Second, p.Restart.Breaker.Open)
	assert.Equal(t, 60*time.Second, p.Restart.Breaker.Stable)
	assert.Equal(t, 10, p.Restart.Storm.Max)
	assert.Equal(t, 60*time.Second, p.Restart.Storm.Window)
	assert.Equal(t, 600*time.Second, p.Restart.RestartCountReset)
}

func TestValues(t *testing.T) {
	pool := func(extra string) string { return minimalPool + extra }
	c, err := Load(writeDir(t, map[string]string{"pools.d/a.pool": pool(`
[Health]
IntervalSec=1min 30s
TimeoutSec=500ms
[Restart]
BackoffInitialSec=0.25
Multiplier=
Multiplier=cuda_error:3 out_of_memory:1.5
[Pool]
AutoStart=no
Description=multi \
  line
[Engine]
Environment="A=b c" D=e
Environment=F=%i
`)}))
	require.NoError(t, err)
	p := c.Pools[0]
	assert.Equal(t, 90*time.Second, p.Health.Interval)
	assert.Equal(t, 500*time.Millisecond, p.Health.Timeout)
	assert.Equal(t, 250*time.Millisecond, p.Restart.Backoff.Initial)
	assert.Equal(t, map[crash.Reason]float64{crash.CUDAError: 3, crash.OutOfMemory: 1.5}, p.Restart.Backoff.Multiplier)
	assert.False(t, p.AutoStart)
	assert.Equal(t, "multi    line", p.Description, "a continuation is a space, like systemd")
	assert.Equal(t, []string{"A=b c", "D=e", "F=%i"}, p.Engine.Environment)
	assert.Equal(t, "F=a", p.Specifiers("").Expand(p.Engine.Environment[2]))
}

// Each bad input must be named by file, section and key, with a reason.
// Pools on demand: IdleStopSec= (empty or 0: off), Pin=, StartOnLease=.
func TestOnDemandKeys(t *testing.T) {
	dir := writeDir(t, map[string]string{"pools.d/a.pool": minimalPool + "[Pool]\nIdleStopSec=5min\nStartOnLease=yes\n",
		"pools.d/b.pool": strings.NewReplacer("Devices=0", "Devices=1", "8081", "8082").Replace(minimalPool) + "[Pool]\nIdleStopSec=30\nIdleStopSec=\nPin=yes\n"})
	c, err := Load(dir)
	require.NoError(t, err)
	require.Len(t, c.Pools, 2)
	assert.Equal(t, 5*time.Minute, c.Pools[0].IdleStop)
	assert.True(t, c.Pools[0].StartOnLease)
	assert.False(t, c.Pools[0].Pin)
	assert.Zero(t, c.Pools[1].IdleStop)
	assert.True(t, c.Pools[1].Pin)
	assert.False(t, c.Pools[1].StartOnLease)
	assert.Equal(t, SleepNone, c.Pools[0].Engine.Sleep, "idleness stops the engine unless Sleep= says otherwise")
	assert.Equal(t, 1, c.Pools[0].Engine.SleepLevel)
}

func TestSleepKeys(t *testing.T) {
	dir := writeDir(t, map[string]string{"pools.d/a.pool": minimalPool + "Sleep=vllm\nSleepLevel=2\n[Pool]\nIdleStopSec=5min\n"})
	c, err := Load(dir)
	require.NoError(t, err)
	assert.Equal(t, SleepVLLM, c.Pools[0].Engine.Sleep)
	assert.Equal(t, 2, c.Pools[0].Engine.SleepLevel)
}

// MemoryRequired=: a size as systemd's MemoryMax= reads one; 0 turns the
// memory fit off; unset (or emptied by a later line) is the default, the
// model's size times 1.2.
func TestMemoryRequired(t *testing.T) {
	for in, want := range map[string]uint64{"0": 0, "1024": 1024, "20G": 20 << 30, "1.5T": 3 << 39, "512M": 512 << 20, "7K": 7 << 10} {
		dir := writeDir(t, map[string]string{"pools.d/a.pool": minimalPool + "[Pool]\nMemoryRequired=" + in + "\n"})
		c, err := Load(dir)
		require.NoError(t, err, in)
		require.NotNil(t, c.Pools[0].MemoryRequired, in)
		assert.Equal(t, want, *c.Pools[0].MemoryRequired, in)
	}
	dir := writeDir(t, map[string]string{"pools.d/a.pool": minimalPool + "[Pool]\nMemoryRequired=8G\nMemoryRequired=\n",
		"pools.d/b.pool": strings.NewReplacer("Devices=0", "Devices=1", "Port=8081", "Port=8082").Replace(minimalPool)})
	c, err := Load(dir)
	require.NoError(t, err)
	assert.Nil(t, c.Pools[0].MemoryRequired, "emptied: the default again")
	assert.Nil(t, c.Pools[1].MemoryRequired, "unset: the default")

	for in, why := range map[string]string{
		"-1G":       `"-1G" is not a size`,
		"20GB":      `"20GB" is not a size`,
		"lots":      `"lots" is not a size`,
		"1e3":       `"1e3" is not a size`,
		"0x10":      `"0x10" is not a size`,
		"NaN":       `"NaN" is not a size`,
		"99999999T": `"99999999T" is not a size`,
		"infinity":  `"infinity": no GPU has infinite memory (0 turns the check off)`,
	} {
		dir := writeDir(t, map[string]string{"pools.d/a.pool": minimalPool + "[Pool]\nMemoryRequired=" + in + "\n"})
		_, err := Load(dir)
		require.Error(t, err, in)
		assert.Contains(t, err.Error(), "a.pool:8: [Pool] MemoryRequired=: "+why, in)
	}
}

func TestErrors(t *testing.T) {
	cases := []struct {
		name  string
		files map[string]string
		want  []string
	}{
		{"unknown section", map[string]string{"pools.d/a.pool": minimalPool + "[Bogus]\nX=1\n"},
			[]string{"a.pool:8: [Bogus] X=: unknown section"}},
		{"unknown key", map[string]string{"pools.d/a.pool": minimalPool + "Prot=1\n"},
			[]string{"a.pool:7: [Engine] Prot=: unknown key in [Engine]: did you mean Port=?"}},
		{"key of another section", map[string]string{"pools.d/a.pool": minimalPool + "[Pool]\nport=8082\n"},
			[]string{"a.pool:8: [Pool] port=: unknown key in [Pool]: Port= belongs in [Engine]"}},
		{"scope key in [Engine]", map[string]string{"pools.d/a.pool": minimalPool + "MemoryMax=1G\n"},
			[]string{"a.pool:7: [Engine] MemoryMax=: unknown key in [Engine]: MemoryMax= belongs in [Scope]"}},
		{"a typo", map[string]string{"pools.d/a.pool": minimalPool + "[Health]\nIntervalSecs=5\n"},
			[]string{"a.pool:8: [Health] IntervalSecs=: unknown key in [Health]: did you mean IntervalSec=?"}},
		{"a swap and the wrong case", map[string]string{"pools.d/a.pool": minimalPool + "ExecStrat=/bin/x\nhealthurl=http://x/\n"},
			[]string{"a.pool:7: [Engine] ExecStrat=: unknown key in [Engine]: did you mean ExecStart=?",
				"a.pool:8: [Engine] healthurl=: unknown key in [Engine]: did you mean HealthURL=?"}},
		{"a prefix", map[string]string{"pools.d/a.pool": minimalPool + "StopTimeout=5\n"},
			[]string{"a.pool:7: [Engine] StopTimeout=: unknown key in [Engine]: did you mean StopTimeoutSec=?"}},
		{"a near miss in another section", map[string]string{"pools.d/a.pool": minimalPool + "[Pool]\nProt=8082\n"},
			[]string{"a.pool:8: [Pool] Prot=: unknown key in [Pool]: did you mean Port= in [Engine]?"}},
		{"nothing near", map[string]string{"pools.d/a.pool": minimalPool + "Zebra=1\n"},
			[]string{"a.pool:7: [Engine] Zebra=: unknown key in [Engine]\n", "a.pool:"}},
		{"a typo in [Scope]", map[string]string{"pools.d/a.pool": minimalPool + "[Scope]\nMemoryMaxx=1G\n"},
			[]string{"a.pool:8: [Scope] MemoryMaxx=: unsupported [Scope] key (supported: CPUQuota CPUWeight Delegate IOWeight MemoryHigh MemoryLow MemoryMax MemoryMin MemorySwapMax OOMPolicy TasksMax): did you mean MemoryMax=?"}},
		{"a key of another section in [Scope]", map[string]string{"pools.d/a.pool": minimalPool + "[Scope]\nSlots=2\n"},
			[]string{"a.pool:8: [Scope] Slots=: unsupported [Scope] key", "): Slots= belongs in [Pool]"}},
		{"a misspelt section", map[string]string{"pools.d/a.pool": minimalPool + "[Helth]\nIntervalSec=5\n"},
			[]string{"a.pool:8: [Helth] IntervalSec=: unknown section (known: [Engine] [Health] [Pool] [Restart] [Scope]); did you mean [Health]?"}},
		{"manager: a key of another section", map[string]string{ManagerFile: "[Manager]\nBackend=static\n", "pools.d/a.pool": minimalPool},
			[]string{"pool-managerd.conf:2: [Manager] Backend=: unknown key in [Manager]: Backend= belongs in [Inventory]"}},
		{"manager: a missing key names its section", map[string]string{ManagerFile: "[Manager]\nAdminGroup=pool-admin\n[Inventory]\nBackend=static\n", "pools.d/a.pool": minimalPool},
			[]string{"pool-managerd.conf:3: [Inventory] Device=: Backend=static needs at least one Device= line"}},
		{"two pools on one port", map[string]string{"pools.d/a.pool": minimalPool, "pools.d/b.pool": strings.Replace(minimalPool, "Devices=0", "Devices=1", 1)},
			[]string{`b.pool:6: [Engine] Port=: 8081 is already the port of pool "a" (`, `a.pool): each engine needs a port of its own`}},
		{"bad number", map[string]string{"pools.d/a.pool": minimalPool + "[Pool]\nSlots=four\n"},
			[]string{"a.pool:8: [Pool] Slots=: \"four\" is not an integer"}},
		{"bad duration", map[string]string{"pools.d/a.pool": minimalPool + "[Health]\nIntervalSec=5 parsecs\n"},
			[]string{"[Health] IntervalSec=: \"5 parsecs\" is not a time span: unknown unit \"parsecs\""}},
		{"idle time too short", map[string]string{"pools.d/a.pool": minimalPool + "[Pool]\nIdleStopSec=10ms\n"},
			[]string{"a.pool:8: [Pool] IdleStopSec=: must be 0 (never idle) or at least 1s, got \"10ms\""}},
		{"idle time negative", map[string]string{"pools.d/a.pool": minimalPool + "[Pool]\nIdleStopSec=-5\n"},
			[]string{"[Pool] IdleStopSec=: \"-5\" is not a time span"}},
		{"unknown sleep", map[string]string{"pools.d/a.pool": minimalPool + "Sleep=VLLM2\n"},
			[]string{"a.pool:7: [Engine] Sleep=: \"VLLM2\" is not none or vllm: did you mean vllm?"}},
		{"sleep level out of range", map[string]string{"pools.d/a.pool": minimalPool + "SleepLevel=3\n"},
			[]string{"a.pool:7: [Engine] SleepLevel=: "}},
		{"sleep without a port", map[string]string{"pools.d/a.pool": strings.Replace(minimalPool, "Port=8081\n", "", 1) + "Sleep=vllm\n"},
			[]string{"[Engine] Sleep=: vllm needs Port=: sleep and wake are asked of the engine's own port on loopback"}},
		{"pin not a boolean", map[string]string{"pools.d/a.pool": minimalPool + "[Pool]\nPin=always\n"},
			[]string{"[Pool] Pin=: "}},
		{"progress without a stall time", map[string]string{"pools.d/a.pool": minimalPool + "[Health]\nProgressURL=http://127.0.0.1:%p/metrics\n"},
			[]string{"a.pool:7: [Health] StallSec=: missing: ProgressURL= needs StallSec="}},
		{"stall time without progress", map[string]string{"pools.d/a.pool": minimalPool + "[Health]\nStallSec=60\n"},
			[]string{"[Health] ProgressURL=: missing: StallSec= needs ProgressURL="}},
		{"progress not a URL", map[string]string{"pools.d/a.pool": minimalPool + "[Health]\nProgressURL=/metrics\nStallSec=60\n"},
			[]string{"[Health] ProgressURL=: \"/metrics\" is not an http:// or https:// URL"}},
		{"warm-up method", map[string]string{"pools.d/a.pool": minimalPool + "[Health]\nWarmupRequest=DELETE /completion\n"},
			[]string{"[Health] WarmupRequest=: \"DELETE /completion\": the method must be GET or POST"}},
		{"warm-up path", map[string]string{"pools.d/a.pool": minimalPool + "[Health]\nWarmupRequest=POST completion\n"},
			[]string{"[Health] WarmupRequest=: \"POST completion\": the path must start with /"}},
		{"warm-up body", map[string]string{"pools.d/a.pool": minimalPool + "[Health]\nWarmupRequest=POST /completion {prompt\n"},
			[]string{"[Health] WarmupRequest=: \"POST /completion {prompt\": the body is not JSON"}},
		{"warm-up GET with a body", map[string]string{"pools.d/a.pool": minimalPool + "[Health]\nWarmupRequest=GET /v1/models {}\n"},
			[]string{"[Health] WarmupRequest=: \"GET /v1/models {}\": a GET has no body"}},
		{"canary without an idle time", map[string]string{"pools.d/a.pool": minimalPool + "[Health]\nCanaryRequest=GET /v1/models\n"},
			[]string{"[Health] CanaryIdleSec=: missing: CanaryRequest= needs CanaryIdleSec="}},
		{"canary idle time alone", map[string]string{"pools.d/a.pool": minimalPool + "[Health]\nCanaryIdleSec=30\n"},
			[]string{"[Health] CanaryRequest=: missing: CanaryIdleSec= needs CanaryRequest="}},
		{"canary timeout alone", map[string]string{"pools.d/a.pool": minimalPool + "[Health]\nCanaryTimeoutSec=30\n"},
			[]string{"[Health] CanaryRequest=: missing: CanaryTimeoutSec= needs CanaryRequest="}},
		{"canary idle time zero", map[string]string{"pools.d/a.pool": minimalPool + "[Health]\nCanaryRequest=GET /v1/models\nCanaryIdleSec=0\n"},
			[]string{"[Health] CanaryIdleSec=: must be more than 0"}},
		{"canary method", map[string]string{"pools.d/a.pool": minimalPool + "[Health]\nCanaryRequest=PUT /x\nCanaryIdleSec=30\n"},
			[]string{"[Health] CanaryRequest=: \"PUT /x\": the method must be GET or POST"}},
		{"canary body", map[string]string{"pools.d/a.pool": minimalPool + "[Health]\nCanaryRequest=POST /x {\nCanaryIdleSec=30\n"},
			[]string{"[Health] CanaryRequest=: \"POST /x {\": the body is not JSON"}},
		{"bad bool", map[string]string{"pools.d/a.pool": minimalPool + "[Pool]\nAutoStart=maybe\n"},
			[]string{"[Pool] AutoStart=: \"maybe\" is not a boolean"}},
		{"missing ExecStart", map[string]string{"pools.d/a.pool": "[Pool]\nDevices=0\nModel=m\n"},
			[]string{"a.pool:3: [Engine] ExecStart=: missing"}},
		{"bad pool id", map[string]string{"pools.d/a.b.pool": minimalPool},
			[]string{`a.b.pool:1: pool id "a.b"`}},
		{"two pools on one GPU", map[string]string{"pools.d/a.pool": minimalPool, "pools.d/b.pool": strings.Replace(minimalPool, "8081", "8082", 1)},
			[]string{`b.pool:2: [Pool] Devices=: GPU "0" is already used by pool "a"`}},
		{"one GPU by index and by UUID", map[string]string{
			ManagerFile:      "[Inventory]\nDevice=0 GPU-8f2c1a70-0000-4000-8000-000000000000 /dev/nvidia0\n",
			"pools.d/a.pool": minimalPool,
			"pools.d/b.pool": strings.NewReplacer("Devices=0", "Devices=GPU-8F2C1A70-0000-4000-8000-000000000000", "8081", "8082").Replace(minimalPool)},
			[]string{`b.pool:2: [Pool] Devices=: GPU "GPU-8F2C1A70-0000-4000-8000-000000000000" is GPU-8f2c1a70-0000-4000-8000-000000000000, which pool "a" names "0"`}},
		{"GPU not in inventory", map[string]string{
			ManagerFile:      "[Inventory]\nBackend=static\nDevice=0 GPU-8f2c1a70-0000-4000-8000-000000000000 /dev/nvidia0\n",
			"pools.d/a.pool": strings.Replace(minimalPool, "Devices=0", "Devices=0 3", 1)},
			[]string{`a.pool:2: [Pool] Devices=: GPU "3" is not in the static inventory`}},
		{"unknown specifier", map[string]string{"pools.d/a.pool": strings.Replace(minimalPool, "%m", "%x", 1)},
			[]string{"[Engine] ExecStart=: unknown specifier %x"}},
		{"port needed", map[string]string{"pools.d/a.pool": strings.Replace(minimalPool, "Port=8081\n", "", 1)},
			[]string{"[Engine] Port=: missing: ExecStart=, HealthURL= or ProgressURL= uses %p"}},
		{"owned scope key", map[string]string{"pools.d/a.pool": minimalPool + "[Scope]\nDeviceAllow=/dev/nvidia1 rw\n"},
			[]string{"[Scope] DeviceAllow=: set by pool-managerd"}},
		{"bad scope value", map[string]string{"pools.d/a.pool": minimalPool + "[Scope]\nMemoryMax=lots\n"},
			[]string{`[Scope] MemoryMax=: "lots" is not a size`}},
		{"delegated controllers", map[string]string{"pools.d/a.pool": minimalPool + "[Scope]\nDelegate=cpu memory\n"},
			[]string{`[Scope] Delegate=: "cpu memory" is not a boolean`}},
		{"bad reason in multiplier", map[string]string{"pools.d/a.pool": minimalPool + "[Restart]\nMultiplier=gremlins:2\n"},
			[]string{`[Restart] Multiplier=: unknown crash reason "gremlins"`}},
		{"inconsistent restart policy", map[string]string{"pools.d/a.pool": minimalPool + "[Restart]\nBackoffMaxSec=0.1\n"},
			[]string{"a.pool:7: [Restart] backoff: maximum delay 100ms is below the minimum 500ms"}},
		{"text before a section", map[string]string{"pools.d/a.pool": "Devices=0\n" + minimalPool},
			[]string{"a.pool:1: text before the first [Section] header"}},
		{"line without =", map[string]string{"pools.d/a.pool": minimalPool + "Garbage\n"},
			[]string{"a.pool:7: syntax error: "}},
		{"unclosed section", map[string]string{"pools.d/a.pool": minimalPool + "[Health\nIntervalSec=5\n"},
			[]string{"a.pool:7: syntax error: "}},
		{"manager: bad key and value", map[string]string{ManagerFile: "[Manager]\nStateDir=relative\nMetricsListen=nope\n[Inventory]\nBackend=cuda\n", "pools.d/a.pool": minimalPool},
			[]string{
				"pool-managerd.conf:2: [Manager] StateDir=: \"relative\" is not an absolute path",
				"pool-managerd.conf:3: [Manager] MetricsListen=: \"nope\" is not host:port",
				"pool-managerd.conf:5: [Inventory] Backend=: \"cuda\" is not auto, nvml or static",
			}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Load(writeDir(t, tc.files))
			require.Error(t, err)
			assert.Nil(t, c, "a bad configuration yields nothing")
			var errs Errors
			require.ErrorAs(t, err, &errs)
			for _, w := range tc.want {
				assert.Contains(t, err.Error()+"\n", w)
			}
			for _, e := range errs {
				assert.Positive(t, e.Line, "%s names its line", e)
			}
		})
	}
}

func TestAllErrorsAtOnce(t *testing.T) {
	dir := writeDir(t, map[string]string{
		"pools.d/a.pool": "[Pool]\nDevices=0\nModel=m\nSlots=x\n[Engine]\nPort=0\n",
		"pools.d/b.pool": "[Pool]\nDevices=zero\n",
	})
	_, err := Load(dir)
	var errs Errors
	require.ErrorAs(t, err, &errs)
	var got []string
	for _, e := range errs {
		got = append(got, filepath.Base(e.File)+" ["+e.Section+"] "+e.Key)
	}
	assert.Equal(t, []string{
		"a.pool [Pool] Slots",
		"a.pool [Engine] Port",
		"a.pool [Engine] ExecStart",
		"b.pool [Pool] Devices",
		"b.pool [Engine] ExecStart",
		"b.pool [Pool] Model",
		"b.pool [Engine] HealthURL",
	}, got, "every error once, none repeated as a follow-on")
}

func TestDuplicatePoolID(t *testing.T) {
	a, b := t.TempDir(), t.TempDir()
	for _, d := range []string{a, b} {
		require.NoError(t, os.WriteFile(filepath.Join(d, "x.pool"), []byte(minimalPool), 0o644))
	}
	_, err := LoadFiles(nil, []string{filepath.Join(a, "x.pool"), filepath.Join(b, "x.pool")})
	require.Error(t, err)
	assert.Contains(t, err.Error(), `duplicate pool id "x"`)
}

func TestNotAConfigDir(t *testing.T) {
	_, err := Load(t.TempDir())
	require.Error(t, err)
	assert.Contains(t, err.Error(), "is this a pool-managerd configuration directory?")
}

func TestParseSeconds(t *testing.T) {
	for in, want := range map[string]time.Duration{
		"5": 5 * time.Second, "0.5": 500 * time.Millisecond, "500ms": 500 * time.Millisecond,
		"1min 30s": 90 * time.Second, "2h": 2 * time.Hour, "1m30s": 90 * time.Second, "0": 0,
	} {
		got, err := parseSeconds(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, got, in)
	}
	for _, in := range []string{"", "-1", "infinity", "5 parsecs", "1e400", "ms", "2 years", "NaN"} {
		_, err := parseSeconds(in)
		assert.Error(t, err, in)
	}
}

func TestSplitWords(t *testing.T) {
	w, err := splitWords(`/bin/x "a b" 'c d' e\ f ""`)
	require.NoError(t, err)
	assert.Equal(t, []string{"/bin/x", "a b", "c d", "e f", ""}, w)
	_, err = splitWords(`/bin/x "open`)
	assert.ErrorContains(t, err, "unterminated")
}

func TestExpand(t *testing.T) {
	sp := Specifiers{ID: "p", Model: "/m", Port: "1", Devices: "0,1"}
	assert.Equal(t, "p /m 1 0,1 %", sp.Expand("%i %m %p %d %%"))
}

func TestManagerDropInsOverride(t *testing.T) {
	dir := writeDir(t, map[string]string{
		ManagerFile:      "[Manager]\nAdminGroup=ops\nMetricsIntervalSec=30\n",
		"pools.d/a.pool": minimalPool,
	})
	require.NoError(t, os.MkdirAll(filepath.Join(dir, ManagerFile+".d"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, ManagerFile+".d", "10-site.conf"), []byte("[Manager]\nAdminGroup=gpu-ops\n"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, ManagerFile+".d", "20-inv.conf"), []byte("[Inventory]\nBackend=static\nDevice=0 GPU-8f2c1a70-0000-4000-8000-000000000000 /dev/nvidia0\n"), 0o644))
	c, err := Load(dir)
	require.NoError(t, err)
	assert.Equal(t, "gpu-ops", c.Manager.AdminGroup, "a later drop-in wins")
	assert.Equal(t, 30*time.Second, c.Manager.MetricsInterval, "what no drop-in sets stays")
	assert.Equal(t, BackendStatic, c.Manager.Inventory.Backend)
}

func TestManagerModelDirs(t *testing.T) {
	tests := []struct {
		name, lines string
		want        []string
	}{
		{"none", "", nil},
		{"space-separated, cleaned, once each", "ModelDirs=/srv/models/ /data//llm /srv/models\n", []string{"/srv/models", "/data/llm"}},
		{"repeated keys add up", "ModelDirs=/a\nModelDirs=/b /a\n", []string{"/a", "/b"}},
		{"empty resets", "ModelDirs=/a\nModelDirs=\nModelDirs=/c\n", []string{"/c"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Load(writeDir(t, map[string]string{ManagerFile: "[Manager]\n" + tt.lines, "pools.d/a.pool": minimalPool}))
			require.NoError(t, err)
			assert.Equal(t, tt.want, c.Manager.ModelDirs)
		})
	}

	_, err := Load(writeDir(t, map[string]string{ManagerFile: "[Manager]\nModelDirs=/ok relative\n", "pools.d/a.pool": minimalPool}))
	require.Error(t, err)
	assert.Contains(t, err.Error(), `pool-managerd.conf:2: [Manager] ModelDirs=: "relative" is not an absolute path`)
}

func TestDeviceIDs(t *testing.T) {
	c, err := Load(writeDir(t, map[string]string{"pools.d/a.pool": minimalPool, "pools.d/b.pool": strings.NewReplacer("Devices=0", "Devices=1", "8081", "8082").Replace(minimalPool) + "DeviceIDs=index\n"}))
	require.NoError(t, err)
	assert.Equal(t, DeviceIDsUUID, c.Pools[0].Engine.DeviceIDs, "the default")
	assert.Equal(t, DeviceIDsIndex, c.Pools[1].Engine.DeviceIDs)

	mig := "MIG-8f2c1a70-0000-4000-8000-0000000000a0"
	cases := []struct {
		name  string
		files map[string]string
		want  string
	}{
		{"unknown value", map[string]string{"pools.d/a.pool": minimalPool + "DeviceIDs=indices\n"},
			`a.pool:7: [Engine] DeviceIDs=: "indices" is not uuid or index: did you mean index?`},
		{"case", map[string]string{"pools.d/a.pool": minimalPool + "DeviceIDs=UUID\n"},
			`[Engine] DeviceIDs=: "UUID" is not uuid or index: did you mean uuid?`},
		{"nothing like it", map[string]string{"pools.d/a.pool": minimalPool + "DeviceIDs=bus\n"},
			`[Engine] DeviceIDs=: "bus" is not uuid or index`},
		{"a MIG device by UUID", map[string]string{"pools.d/a.pool": strings.Replace(minimalPool, "Devices=0", "Devices=0 "+mig, 1) + "DeviceIDs=index\n"},
			"a.pool:7: [Engine] DeviceIDs=: index: MIG device " + mig + " has no index"},
		{"a MIG device by index in the static inventory", map[string]string{
			ManagerFile:      "[Inventory]\nBackend=static\nDevice=4 " + mig + " /dev/nvidia4\n",
			"pools.d/a.pool": strings.Replace(minimalPool, "Devices=0", "Devices=4", 1) + "DeviceIDs=index\n"},
			`a.pool:7: [Engine] DeviceIDs=: index: GPU "4" is MIG device ` + mig + " in the static inventory"},
		{"CUDA_DEVICE_ORDER with indices", map[string]string{"pools.d/a.pool": minimalPool + "DeviceIDs=index\nEnvironment=CUDA_DEVICE_ORDER=FASTEST_FIRST\n"},
			"a.pool:8: [Engine] Environment=: CUDA_DEVICE_ORDER is set by pool-managerd with DeviceIDs=index"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Load(writeDir(t, c.files))
			require.Error(t, err)
			assert.Contains(t, err.Error(), c.want)
		})
	}
	// With UUIDs a MIG device and CUDA_DEVICE_ORDER are fine.
	_, err = Load(writeDir(t, map[string]string{"pools.d/a.pool": strings.Replace(minimalPool, "Devices=0", "Devices="+mig, 1) + "Environment=CUDA_DEVICE_ORDER=PCI_BUS_ID\n"}))
	require.NoError(t, err)
}

func TestManagerCacheDir(t *testing.T) {
	c, err := Load(writeDir(t, map[string]string{ManagerFile: "[Manager]\nCacheDir=/srv/cache/pm/\n"}))
	require.NoError(t, err)
	assert.Equal(t, "/srv/cache/pm", c.Manager.CacheDir)
	assert.Equal(t, "/var/cache/pool-managerd", DefaultManager().CacheDir)
	_, err = Load(writeDir(t, map[string]string{ManagerFile: "[Manager]\nCacheDir=cache\n"}))
	assert.ErrorContains(t, err, `[Manager] CacheDir=: "cache" is not an absolute path`)
}

func TestManagerEngineUIDs(t *testing.T) {
	c, err := Load(writeDir(t, map[string]string{ManagerFile: "[Manager]\nEngineUIDs=70000-70999\n"}))
	require.NoError(t, err)
	assert.Equal(t, UIDRange{First: 70000, Last: 70999}, c.Manager.EngineUIDs)
	c, err = Load(writeDir(t, map[string]string{ManagerFile: "[Manager]\nEngineUIDs=60100-60100\n"}))
	require.NoError(t, err)
	assert.Equal(t, UIDRange{First: 60100, Last: 60100}, c.Manager.EngineUIDs, "one uid is a range")

	for _, tt := range []struct{ value, want string }{
		{"70000", `EngineUIDs=: "70000" is not FIRST-LAST (e.g. 65536-99999)`},
		{"a-b", `EngineUIDs=: "a-b" is not FIRST-LAST of two uids`},
		{"-5-10", `EngineUIDs=: "-5-10" is not FIRST-LAST of two uids`},
		{"70000-4294967296", `is not FIRST-LAST of two uids`},
		{"80000-70000", `EngineUIDs=: "80000-70000": the first uid 80000 is above the last 70000`},
		{"0-100", `overlaps 0-999, root and the system users`},
		{"900-2000", `overlaps 0-999, root and the system users`},
		{"60000-62000", `overlaps 61184-65519, systemd's DynamicUser= range`},
		{"65534-65534", `overlaps 65534-65535, nobody`},
		{"99999-600000", `overlaps 524288-1879048191, systemd's container range`},
		{"2000000000-2200000000", `overlaps 2147483648-4294967295`},
		{"4294967295-4294967295", `overlaps 2147483648-4294967295`},
	} {
		_, err := Load(writeDir(t, map[string]string{ManagerFile: "[Manager]\nEngineUIDs=" + tt.value + "\n"}))
		require.Error(t, err, tt.value)
		assert.Contains(t, err.Error(), tt.want, tt.value)
		assert.Contains(t, err.Error(), ManagerFile, "the error names the file")
	}
}

// An empty User= is the default: a user of the pool's own.
func TestEmptyUserIsThePoolsOwn(t *testing.T) {
	c, err := Load(writeDir(t, map[string]string{"pools.d/a.pool": minimalPool + "User=pool-engine\nUser=\n"}))
	require.NoError(t, err)
	assert.Empty(t, c.Pools[0].Engine.User)
}
