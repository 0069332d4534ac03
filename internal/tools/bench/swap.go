package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/godbus/dbus/v5"

	api "github.com/llorch/pool-managerd/dbus"
	"github.com/llorch/pool-managerd/internal/bus"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// The group swap figure's two pools share GPU 3 in one group; the wake
// figure's vLLM pool sleeps on GPU 4.
const (
	swapPoolA = "swap-a"
	swapPoolB = "swap-b"
	wakePool  = "wake"
	// vllmModel is the wake pool's model directory (under models/).
	vllmModel = "tiny"
)

// onDemandPools are every pool the on-demand figures write, removed
// before the 64-pool figure (they would share its GPUs).
var onDemandPools = []string{odPool, swapPoolA, swapPoolB, wakePool}

// swapPoolFile is one member of the group: no idle stop, health probed
// as the bench pool's.
func (b *bench) swapPoolFile(port int) []byte {
	return testpool.SimPoolFile(b.sim, "3", smallModel, port, `[Pool]
Group=swap
[Health]
IntervalSec=0.1
TimeoutSec=0.1
StartTimeoutSec=60
`)
}

// wakePoolFile is the simulator in vLLM mode with sleep mode: unused for
// a second it sleeps; no warm-up, so a wake serves once /wake_up answers.
func (b *bench) wakePoolFile(port int) []byte {
	return []byte(fmt.Sprintf(`[Pool]
Devices=4
Model=%s
IdleStopSec=1
StartOnLease=yes
[Engine]
ExecStart=%s --engine vllm --model %%m --port %%p --enable-sleep-mode --gpu-mem-mb 8
Port=%d
StopTimeoutSec=2
Sleep=vllm
SleepLevel=1
[Health]
IntervalSec=0.1
TimeoutSec=0.1
StartTimeoutSec=60
`, vllmModel, b.sim, port))
}

// writeVLLMModel writes a model directory vLLM (and the simulator) takes.
func (b *bench) writeVLLMModel() {
	dir := filepath.Join(b.dir, "models", vllmModel)
	must(os.MkdirAll(dir, 0o755))
	must(os.WriteFile(filepath.Join(dir, "config.json"),
		[]byte(`{"architectures":["LlamaForCausalLM"],"model_type":"llama","max_position_embeddings":2048}`), 0o644))
	must(os.WriteFile(filepath.Join(dir, "model.safetensors"), make([]byte, 64<<10), 0o644))
}

var (
	swapFig = Figure{Name: "group swap", Unit: "ms", Basis: "median",
		Reference: "the engine alone, SIGTERM to exit, then start to healthy",
		Goal:      Goal{Text: "overhead < 50 ms", Of: "overhead", AtMost: 50}}
	wakeFig = Figure{Name: "wake", Unit: "ms", Basis: "median",
		Reference: "the engine alone, POST /wake_up answered",
		Goal:      Goal{Text: "overhead < 20 ms", Of: "overhead", AtMost: 20}}
)

// swapSamples and wakeSamples are how many swaps and wakes a round takes.
const (
	swapSamples = 10
	wakeSamples = 10
)

// sumEach is a[i] + b[i], pairwise: one sample's reference made of two
// measured parts.
func sumEach(a, b []time.Duration) []time.Duration {
	if len(a) != len(b) {
		must(fmt.Errorf("%d samples against %d", len(a), len(b)))
	}
	out := make([]time.Duration, len(a))
	for i := range a {
		out[i] = a[i] + b[i]
	}
	return out
}

// overheadRound is a round judged on its median less the reference's.
func overheadRound(r int, ours, ref []time.Duration) Round {
	rd := newRound(r, "median", msAll(ours), msAll(ref))
	rd.Overhead = rd.Median - rd.RefMedian
	rd.Ratio = 0 // an overhead goal: the ratio says little of a start
	return rd
}

// engineStopStart runs the simulator by hand on model: once /health
// answers, SIGTERM until it exited (the stop), then again from its exec
// until /health answers (the start).
func (b *bench) engineStopStart(model string) (stop, start time.Duration) {
	url := fmt.Sprintf("http://127.0.0.1:%d/health", b.alonePort)
	cmd := exec.Command(b.sim, "--model", model, "--port", strconv.Itoa(b.alonePort))
	must(cmd.Start())
	if !waitHTTP(url, "GET", 2*time.Minute) {
		cmd.Process.Kill()
		cmd.Wait()
		must(fmt.Errorf("the engine alone on %s was not healthy within 2 minutes", model))
	}
	t0 := time.Now()
	must(cmd.Process.Signal(syscall.SIGTERM))
	cmd.Wait()
	stop = time.Since(t0)
	return stop, b.engineAlone(model)
}

// waitHTTP asks url (a fresh connection each time, as the daemon's
// probes) until it answers 200; false after d.
func waitHTTP(url, method string, d time.Duration) bool {
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 2 * time.Second}
	deadline := time.Now().Add(d)
	for {
		req, err := http.NewRequest(method, url, nil)
		must(err)
		resp, err := client.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return true
			}
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(time.Millisecond)
	}
}

// swapRound: EnsureReady of the parked member of the group until it
// answers (the awake one drained, parked, its engine stopped, the other's
// started and healthy), against the engine alone stopped by SIGTERM and
// started again, in turn. Each swap goes the other way from the last.
func (b *bench) swapRound(r int, figs *Figures) {
	w := watch(b.conn, dbus.WithMatchPathNamespace(bus.ManagerPath))
	defer w.close()
	model := filepath.Join(b.dir, "models", smallModel)
	var ours, stops, starts []time.Duration
	var gone, running, healthy []float64
	for range swapSamples {
		awake, parked := swapPoolA, swapPoolB
		if b.get(swapPoolB, "Ready") == true {
			awake, parked = swapPoolB, swapPoolA
		}
		b.waitReady(awake)
		b.waitIdle(parked, time.Minute)
		w.drain()
		t0 := time.Now()
		must(b.mgr.Call(bus.ManagerIface+".EnsureReady", 0, parked, uint64(60000)).Err)
		took := time.Since(t0)
		ours = append(ours, took)
		// Where the time went, from the signals seen meanwhile: the awake
		// engine gone, the parked one running.
		var left, live time.Time
		for left.IsZero() || live.IsZero() {
			c, ok := w.seen(time.Second, func(c change) bool {
				return c.path == api.PoolPath(awake) && c.has("Live", false) || c.path == api.PoolPath(parked) && c.has("Live", true)
			})
			if !ok {
				break
			}
			if c.path == api.PoolPath(awake) {
				left = c.at
			} else {
				live = c.at
			}
		}
		if !left.IsZero() && left.Before(live) && live.Before(t0.Add(took)) {
			gone = append(gone, ms(left.Sub(t0)))
			running = append(running, ms(live.Sub(left)))
			healthy = append(healthy, ms(t0.Add(took).Sub(live)))
		}
		stop, start := b.engineStopStart(model)
		stops, starts = append(stops, stop), append(starts, start)
	}
	rd := overheadRound(r, ours, sumEach(stops, starts))
	rd.Parts = map[string]float64{"1 awake engine gone (Live=false)": median(gone), "2 parked engine running (Live=true)": median(running),
		"3 answered": median(healthy), "engine alone: stop": median(msAll(stops)), "engine alone: start": median(msAll(starts))}
	figs.add(swapFig, rd)
}

// asleep waits until the pool sleeps with its engine asleep: a wake then
// meets no Sleep still out.
func (b *bench) asleep(id string, port int, d time.Duration) {
	deadline := time.Now().Add(d)
	for b.get(id, "State") != "sleeping" || !sleeping(port) {
		if time.Now().After(deadline) {
			must(fmt.Errorf("pool %s not asleep within %s: %v (%v)", id, d, b.get(id, "State"), b.get(id, "LastError")))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// sleeping asks the simulator on port whether it sleeps.
func sleeping(port int) bool {
	client := &http.Client{Timeout: 2 * time.Second}
	resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d/is_sleeping", port))
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	var v struct {
		Sleeping bool `json:"is_sleeping"`
	}
	return json.NewDecoder(resp.Body).Decode(&v) == nil && v.Sleeping
}

// wakeRound: EnsureReady of the sleeping pool until it answers, against
// the same simulator run by hand, put to sleep and woken by POST /wake_up
// until that answers (what the daemon waits for without a warm-up), in
// turn.
func (b *bench) wakeRound(r, port int, figs *Figures) {
	w := watch(b.conn, dbus.WithMatchPathNamespace(bus.ManagerPath))
	defer w.close()
	path := api.PoolPath(wakePool)
	base := fmt.Sprintf("http://127.0.0.1:%d", b.alonePort)
	cmd := exec.Command(b.sim, "--engine", "vllm", "--model", filepath.Join(b.dir, "models", vllmModel),
		"--port", strconv.Itoa(b.alonePort), "--enable-sleep-mode", "--gpu-mem-mb", "8")
	must(cmd.Start())
	defer func() {
		cmd.Process.Kill()
		cmd.Wait()
	}()
	if !waitHTTP(base+"/health", "GET", 2*time.Minute) {
		must(fmt.Errorf("the vLLM engine alone was not healthy within 2 minutes"))
	}
	var ours, alone []time.Duration
	var waking []float64
	for i := range wakeSamples {
		b.asleep(wakePool, port, time.Minute)
		w.drain()
		t0 := time.Now()
		must(b.mgr.Call(bus.ManagerIface+".EnsureReady", 0, wakePool, uint64(60000)).Err)
		took := time.Since(t0)
		ours = append(ours, took)
		c, ok := w.seen(time.Second, func(c change) bool { return c.path == path && c.has("State", "waking") })
		if ok && c.at.Before(t0.Add(took)) {
			waking = append(waking, ms(c.at.Sub(t0)))
		}
		if !waitHTTP(base+"/sleep?level=1", "POST", 10*time.Second) || !sleeping(b.alonePort) {
			must(fmt.Errorf("wake %d: the vLLM engine alone did not sleep", i+1))
		}
		t1 := time.Now()
		if !waitHTTP(base+"/wake_up", "POST", 10*time.Second) {
			must(fmt.Errorf("wake %d: the vLLM engine alone did not wake", i+1))
		}
		alone = append(alone, time.Since(t1))
	}
	rd := overheadRound(r, ours, alone)
	rd.Parts = map[string]float64{"1 sleeping -> waking": median(waking), "engine alone": median(msAll(alone))}
	figs.add(wakeFig, rd)
}
