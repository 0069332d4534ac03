package engines

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/cucumber/godog"

	lc "github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/testkit/bdd/capture"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// onDemand is what the on-demand steps keep of a scenario.
type onDemand struct {
	leases []string
	errs   []error
	ensure error
}

func onDemandSteps(sc *godog.ScenarioContext, w *lifecycle) {
	d := &onDemand{}
	sc.Step(`^a ready pool "llama8b" that goes idle after (\d+) seconds? unused(, starting on lease)?$`, func(ctx context.Context, n int, onLease string) error {
		w.t = &scenarioT{TestingT: godog.T(ctx)}
		w.logs = capture.NewLog()
		w.env = testpool.New(w.t, w.logs)
		extra := fmt.Sprintf("[Pool]\nIdleStopSec=%d\n", n)
		if onLease != "" {
			extra += "StartOnLease=yes\n"
		}
		w.pool = w.env.Start(testpool.Spec{ID: "llama8b", Devices: "0", Extra: extra})
		var err error
		w.first, err = w.pool.Wait("ready", testpool.ReadyAfter(1))
		w.beforeFault = w.first
		return err
	})
	sc.Step(`^a ready vLLM pool "vllm8b" that sleeps after (\d+) seconds? unused, starting on lease$`, func(ctx context.Context, n int) error {
		w.t = &scenarioT{TestingT: godog.T(ctx)}
		w.logs = capture.NewLog()
		w.env = testpool.New(w.t, w.logs)
		dir := filepath.Join(w.env.Dir, "models", "tiny")
		if err := os.Mkdir(dir, 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, "config.json"),
			[]byte(`{"architectures":["LlamaForCausalLM"],"model_type":"llama","max_position_embeddings":2048}`), 0o644); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, "model.safetensors"), make([]byte, 64<<10), 0o644); err != nil {
			return err
		}
		w.pool = w.env.Start(testpool.Spec{ID: "vllm8b", Devices: "0", Model: dir,
			SimArgs: "--engine vllm --enable-sleep-mode --gpu-mem-mb 8", Engine: "Version=sim-1\nStopTimeoutSec=2\nSleep=vllm\n",
			Extra: fmt.Sprintf("[Pool]\nIdleStopSec=%d\nStartOnLease=yes\n", n)})
		var err error
		w.first, err = w.pool.Wait("ready", testpool.ReadyAfter(1))
		w.beforeFault = w.first
		return err
	})
	sc.Step(`^the pool falls asleep$`, func() error {
		_, err := w.pool.Wait("sleeping", func(s supervisor.Snapshot) bool { return s.State == lc.Sleeping && s.Live })
		return err
	})
	sc.Step(`^the simulator says the engine is asleep with no GPU memory held$`, func() error {
		var mem struct {
			Bytes    int64 `json:"gpu_mem_bytes"`
			Sleeping bool  `json:"sleeping"`
		}
		// The state changes as the sleep is asked; the engine answers a
		// moment later.
		for end := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/sim/memory", w.pool.Port))
			if err != nil {
				return err
			}
			err = json.NewDecoder(resp.Body).Decode(&mem)
			resp.Body.Close()
			if err != nil {
				return err
			}
			if mem.Sleeping && mem.Bytes == 0 {
				return nil
			}
			if time.Now().After(end) {
				return fmt.Errorf("the simulator says sleeping=%t with %d bytes of GPU memory", mem.Sleeping, mem.Bytes)
			}
		}
	})
	sc.Step(`^the simulator is given the fault "([^"]+)"$`, func(kind string) error { return w.pool.Fault(kind) })
	sc.Step(`^the pool goes idle$`, func() error {
		_, err := w.pool.Wait("idle", func(s supervisor.Snapshot) bool { return s.State == lc.Idle && !s.Live })
		return err
	})
	sc.Step(`^(\d+) routers ask for a lease at once$`, func(n int) {
		d.leases, d.errs = make([]string, n), make([]error, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() { d.leases[i], d.errs[i] = w.pool.AcquireLease(fmt.Sprintf("router-%d", i)) })
		}
		wg.Wait()
	})
	sc.Step(`^every router gets a lease$`, func() error {
		for i, err := range d.errs {
			if err != nil || d.leases[i] == "" {
				return fmt.Errorf("router %d: lease %q, %v", i, d.leases[i], err)
			}
		}
		return nil
	})
	sc.Step(`^every router is refused as not ready$`, func() error {
		for i, err := range d.errs {
			if !errors.Is(err, lc.ErrNotReady) {
				return fmt.Errorf("router %d: lease %q, %v", i, d.leases[i], err)
			}
		}
		return nil
	})
	sc.Step(`^EnsureReady is called with a timeout of (\d+) ms$`, func(ms int) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Duration(ms)*time.Millisecond+5*time.Second)
		defer cancel()
		d.ensure = w.pool.EnsureReady(ctx, time.Duration(ms)*time.Millisecond)
	})
	sc.Step(`^EnsureReady succeeds$`, func() error { return d.ensure })
	sc.Step(`^no crash is counted$`, func() error {
		if s := w.pool.Snapshot(); s.Policy.CrashCount != 0 || s.LastReason != "" {
			return fmt.Errorf("%d crashes, the last %q", s.Policy.CrashCount, s.LastReason)
		}
		return nil
	})
}
