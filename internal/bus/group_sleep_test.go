package bus_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
)

// sleepMember is a vLLM simulator pool of group chat on GPU 0 that sleeps
// (Sleep=vllm) and sends a canary to an engine idle for 0.3 s.
func sleepMember(port int) string {
	return fmt.Sprintf(`[Pool]
Devices=0
Model=tiny
Slots=2
Group=chat
GroupDrainSec=4
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
CanaryRequest=POST /v1/completions {"prompt":"Hi","max_tokens":1}
CanaryIdleSec=0.3
CanaryTimeoutSec=1
[Restart]
BackoffInitialSec=0.2
`, os.Getenv(sandbox.BinEnv("pool-engine-sim")), port)
}

// completions reads the completion requests an engine's scope logged
// since then (vLLM's access lines).
func completions(t *testing.T, unit string, since time.Time) int {
	t.Helper()
	out, _ := exec.Command("journalctl", "-u", unit, "--no-pager", "-o", "cat",
		"--since", fmt.Sprintf("@%d.%06d", since.Unix(), since.Nanosecond()/1000)).Output()
	return strings.Count(string(out), `"POST /v1/completions HTTP/1.1"`)
}

// A group's park of a member whose engine sleeps (Sleep=vllm) puts it to
// sleep instead of stopping it: the same process, asleep (its GPU memory
// given back), the pool sleeping (reason group, no crash), and the asked
// member started only once the sleep is confirmed. Asleep it gets no
// canary, while the awake member does. Asking for it again parks the
// other the same way and wakes it: the same engine serves.
func TestGroupParkPutsASleepingEngineToSleep(t *testing.T) {
	dir, port := configure(t)
	model := vllmModel(t, dir)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", "llama-8b.pool"), []byte(sleepMember(port)), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", "mistral.pool"), []byte(sleepMember(port+1)), 0o644))
	t.Cleanup(func() { exec.Command("systemctl", "stop", "pool-engine-mistral.scope").Run() })
	const llamaUnit = "pool-engine-llama\\x2d8b.scope"
	start(t, dir)

	waitProp(t, "llama-8b", "Ready", "b true")
	waitProp(t, "mistral", "State", `s "idle"`)
	pid := getProp(t, "llama-8b", "MainPID")

	out, err := call("EnsureReady", "st", "mistral", "30000")
	require.NoError(t, err, out)
	assert.Equal(t, "b true", getProp(t, "mistral", "Ready"))
	assert.Equal(t, `s "sleeping"`, getProp(t, "llama-8b", "State"), "parked asleep before mistral was answered")
	assert.Equal(t, pid, getProp(t, "llama-8b", "MainPID"), "the engine sleeps, it is not stopped")
	assert.Equal(t, "b true", getProp(t, "llama-8b", "Live"))
	assert.Equal(t, "u 0", getProp(t, "llama-8b", "CrashCount"))
	assert.Equal(t, true, simGet(t, port, "/is_sleeping")["is_sleeping"])
	assert.Equal(t, float64(0), simGet(t, port, "/sim/memory")["gpu_mem_bytes"], "asleep, its GPU memory is given back")
	out = sh(t, "journalctl", "-u", "pool-managerd.service", "--no-pager", "-o", "verbose", "POOL_ID=llama-8b",
		"MESSAGE=pool parked: its GPUs go to another pool of its group")
	assert.Contains(t, out, "REASON=group")
	assert.Contains(t, out, "NEW_STATE=sleeping")

	// Asleep: probed, no canary; the awake member gets its canaries.
	// The window is three of the awake member's canaries: as many turns
	// in which the sleeping one would have had its own.
	since := time.Now()
	require.Eventually(t, func() bool { return completions(t, "pool-engine-mistral.scope", since) >= 3 }, 10*time.Second, 100*time.Millisecond,
		"the awake member gets canaries")
	assert.Equal(t, `s "sleeping"`, getProp(t, "llama-8b", "State"))
	assert.Zero(t, completions(t, llamaUnit, since), "no canary reaches the sleeping engine")

	// And back: mistral sleeps in turn, llama-8b's engine wakes.
	mistral := getProp(t, "mistral", "MainPID")
	out, err = call("EnsureReady", "st", "llama-8b", "30000")
	require.NoError(t, err, out)
	assert.Equal(t, "b true", getProp(t, "llama-8b", "Ready"))
	assert.Equal(t, pid, getProp(t, "llama-8b", "MainPID"), "the same engine serves")
	assert.Equal(t, `s "sleeping"`, getProp(t, "mistral", "State"))
	assert.Equal(t, mistral, getProp(t, "mistral", "MainPID"))
	assert.Equal(t, "u 0", getProp(t, "mistral", "CrashCount"))
	require.Eventually(t, func() bool { return groupSwaps(t, dir) == 2 }, 10*time.Second, 50*time.Millisecond)

	// Reload of the sleeping member: in its turn (llama-8b parked
	// asleep), its sleeping engine is stopped and the new model serves.
	tiny2 := filepath.Join(dir, "models", "tiny2")
	require.NoError(t, os.Mkdir(tiny2, 0o755))
	for _, f := range []string{"config.json", "model.safetensors"} {
		b, err := os.ReadFile(filepath.Join(model, f))
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(tiny2, f), append(b, '\n'), 0o644))
	}
	out, err = call("Reload", "sst", "mistral", "tiny2", "30000")
	require.NoError(t, err, out)
	assert.Equal(t, `s "ready"`, getProp(t, "mistral", "State"))
	assert.Equal(t, `s "tiny2"`, getProp(t, "mistral", "Model"))
	assert.NotEqual(t, mistral, getProp(t, "mistral", "MainPID"), "a fresh engine on the new model")
	assert.Equal(t, `s "sleeping"`, getProp(t, "llama-8b", "State"))
	assert.FileExists(t, filepath.Join(dir, "pools.d", "mistral.pool.d", "50-Model.conf"))
}

// A daemon restart keeps a group as it was: the member parked asleep is
// adopted asleep (the same engine, not woken: no weights loaded beside the
// awake member's), the awake one stays ready on its engine, and nothing is
// parked or swapped; the sleeping member's next use is a swap as before.
func TestDaemonRestartLeavesAParkedMemberAsleep(t *testing.T) {
	dir, port := configure(t)
	vllmModel(t, dir)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", "llama-8b.pool"), []byte(sleepMember(port)), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", "mistral.pool"), []byte(sleepMember(port+1)), 0o644))
	t.Cleanup(func() { exec.Command("systemctl", "stop", "pool-engine-mistral.scope").Run() })
	start(t, dir)

	waitProp(t, "llama-8b", "Ready", "b true")
	waitProp(t, "mistral", "State", `s "idle"`)
	llama := getProp(t, "llama-8b", "MainPID")
	out, err := call("EnsureReady", "st", "mistral", "30000")
	require.NoError(t, err, out)
	mistral := getProp(t, "mistral", "MainPID")
	require.Equal(t, `s "sleeping"`, getProp(t, "llama-8b", "State"))
	since := getProp(t, "llama-8b", "IdleSinceUSec")
	require.Eventually(t, func() bool {
		b, _ := os.ReadFile(filepath.Join(dir, "run", "pools", "llama-8b.json"))
		return strings.Contains(string(b), `"asleep"`) && strings.Contains(string(b), `"parked": true`)
	}, 5*time.Second, 20*time.Millisecond, "its runtime record says it was left asleep")

	restarted := time.Now()
	sh(t, "systemctl", "restart", "pool-managerd.service")
	waitProp(t, "mistral", "Ready", "b true")
	assert.Equal(t, mistral, getProp(t, "mistral", "MainPID"), "the awake member adopted, not started again")
	// Probed for a while: it sleeps on.
	time.Sleep(time.Second)
	assert.Equal(t, `s "sleeping"`, getProp(t, "llama-8b", "State"))
	assert.Equal(t, llama, getProp(t, "llama-8b", "MainPID"), "adopted asleep, not started again")
	assert.Equal(t, "b true", getProp(t, "llama-8b", "Live"))
	assert.Equal(t, since, getProp(t, "llama-8b", "IdleSinceUSec"))
	assert.Equal(t, true, simGet(t, port, "/is_sleeping")["is_sleeping"], "not woken")
	assert.Equal(t, float64(0), simGet(t, port, "/sim/memory")["gpu_mem_bytes"], "its GPU memory still given back")
	assert.Equal(t, "b true", getProp(t, "mistral", "Ready"))
	assert.Equal(t, mistral, getProp(t, "mistral", "MainPID"))
	assert.Equal(t, float64(8<<20), simGet(t, port+1, "/sim/memory")["gpu_mem_bytes"])
	assert.Equal(t, "u 0", getProp(t, "llama-8b", "CrashCount"))
	assert.Equal(t, "u 0", getProp(t, "mistral", "CrashCount"))
	parks, _ := exec.Command("journalctl", "-u", "pool-managerd.service", "--no-pager", "-q", "-o", "cat",
		"--since", fmt.Sprintf("@%d.%06d", restarted.Unix(), restarted.Nanosecond()/1000), "REASON=group").Output()
	assert.Empty(t, strings.TrimSpace(string(parks)), "nothing parked at the restart")
	assert.Contains(t, sh(t, "journalctl", "-u", "pool-managerd.service", "--no-pager", "-o", "cat", "POOL_ID=llama-8b"),
		"adopted the sleeping engine")

	// Its next use: mistral parked asleep, the same llama-8b engine woken.
	out, err = call("EnsureReady", "st", "llama-8b", "30000")
	require.NoError(t, err, out)
	assert.Equal(t, llama, getProp(t, "llama-8b", "MainPID"))
	assert.Equal(t, false, simGet(t, port, "/is_sleeping")["is_sleeping"])
	assert.Equal(t, `s "sleeping"`, getProp(t, "mistral", "State"))
	assert.Equal(t, mistral, getProp(t, "mistral", "MainPID"))
	// Counted by the restarted daemon, from 0: the restart swapped nothing.
	require.Eventually(t, func() bool { return groupSwaps(t, dir) == 1 }, 10*time.Second, 50*time.Millisecond)
}
