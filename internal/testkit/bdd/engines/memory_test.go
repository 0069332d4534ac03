package engines

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"github.com/cucumber/godog"

	"github.com/llorch/pool-managerd/internal/gpu"
	lc "github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/testkit/bdd/capture"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// gpu0 is the UUID the fake GPU 0 reports its memory under.
const gpu0 = "GPU-8f2c1a70-0000-4000-8000-000000000000"

// memoryWorld is what the memory steps keep: the pool that holds GPU
// memory, the one that needs it, and what its start answered.
type memoryWorld struct {
	holder  *testpool.Pool
	pid     int
	held    uint64
	total   uint64
	big     *testpool.Pool
	before  supervisor.Snapshot
	started error
	reads   atomic.Int32
}

func memorySteps(sc *godog.ScenarioContext, w *lifecycle) {
	m := &memoryWorld{}
	// GPU 0's memory as NVML would tell it: what the holder's engine
	// uses while its process lives. Only the GPU is fake; the holder is
	// a real engine in its pool's scope.
	memory := func() ([]gpu.DeviceMemory, error) {
		m.reads.Add(1)
		d := gpu.DeviceMemory{UUID: gpu0, Total: m.total, Free: m.total}
		if alive(m.pid) {
			d.Free -= m.held
			d.Holders = []gpu.MemoryHolder{{Holder: gpu.Holder{PID: m.pid, Command: "pool-engine-sim"}, Used: m.held}}
		}
		return []gpu.DeviceMemory{d}, nil
	}
	sc.Step(`^a ready pool "([^"]+)" whose engine holds (\d+)G of GPU 0's (\d+)G$`, func(ctx context.Context, id string, held, total int) error {
		w.t = &scenarioT{TestingT: godog.T(ctx)}
		w.logs = capture.NewLog()
		w.env = testpool.New(w.t, w.logs)
		m.holder = w.env.Start(testpool.Spec{ID: id, Devices: "1"})
		s, err := m.holder.Wait("ready", testpool.ReadyAfter(1))
		if err != nil {
			return err
		}
		m.pid, m.held, m.total = s.MainPID, uint64(held)<<30, uint64(total)<<30
		return nil
	})
	sc.Step(`^a pool "([^"]+)" on GPU 0 with MemoryRequired=(\d+)G$`, func(id string, n int) {
		// The GPUs' holders are asked only as the scope is made: none.
		m.big = w.env.Start(testpool.Spec{ID: id, Devices: "0", NoStart: true, MemoryRetry: 300 * time.Millisecond,
			Memory: memory, Holders: func() ([]supervisor.GPUHolder, error) { return nil, nil },
			Extra: fmt.Sprintf("[Pool]\nMemoryRequired=%dG\n", n)})
		w.pool = m.big
		m.before = m.big.Snapshot()
	})
	sc.Step(`^pool "([^"]+)" is started$`, func(id string) error {
		if m.big == nil || m.big.ID != id {
			return fmt.Errorf("no pool %q waits to start", id)
		}
		m.started = m.big.Start()
		return nil
	})
	sc.Step(`^the start is refused for want of GPU memory, naming pool "([^"]+)" as holding (\d+)G$`, func(holder string, n int) error {
		if !errors.Is(m.started, lc.ErrNoGPUMemory) {
			return fmt.Errorf("the start answered %v, not a want of GPU memory", m.started)
		}
		free := (m.total - m.held) >> 30
		want := fmt.Sprintf("GPU %s has %dG free of %dG, used by pool %s (pid %d, pool-engine-sim, %dG)", gpu0, free, m.total>>30, holder, m.pid, n)
		if !strings.Contains(m.started.Error(), want) {
			return fmt.Errorf("the refusal %q does not say %q", m.started, want)
		}
		return nil
	})
	noCrash := func(s supervisor.Snapshot) error {
		if s.Policy.CrashCount != 0 || s.Policy.Streak != m.before.Policy.Streak || s.Policy.Breaker.String() != "closed" {
			return fmt.Errorf("%d crashes, failure streak %d (was %d), breaker %s", s.Policy.CrashCount, s.Policy.Streak, m.before.Policy.Streak, s.Policy.Breaker)
		}
		return nil
	}
	sc.Step(`^the pool is failed and not live, its last error saying why, no crash counted and its failure streak unchanged$`, func() error {
		s := m.big.Snapshot()
		if s.State != lc.Failed || s.Live {
			return fmt.Errorf("pool %s live=%t, want failed and not live", s.State, s.Live)
		}
		if !strings.Contains(s.LastError, "used by pool ") {
			return fmt.Errorf("last error %q does not name who holds the memory", s.LastError)
		}
		return noCrash(s)
	})
	sc.Step(`^after (\d+) seconds? the pool has looked at the memory again without starting an engine or counting a crash$`, func(n int) error {
		was := m.reads.Load()
		time.Sleep(time.Duration(n) * time.Second)
		if got := m.reads.Load(); got < was+2 {
			return fmt.Errorf("the memory was read %d times in %d s, want it looked at again at each retry", got-was, n)
		}
		s := m.big.Snapshot()
		if s.Live || s.Starts != 0 {
			return fmt.Errorf("an engine was started: live=%t, %d starts", s.Live, s.Starts)
		}
		return noCrash(s)
	})
	sc.Step(`^pool "([^"]+)" stops, its engine freeing the memory$`, func(id string) error {
		if m.holder == nil || m.holder.ID != id {
			return fmt.Errorf("no pool %q holds memory", id)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := m.holder.Stop(ctx); err != nil {
			return err
		}
		if alive(m.pid) {
			return fmt.Errorf("engine %d of pool %s still runs", m.pid, id)
		}
		return nil
	})
	sc.Step(`^the pool starts by itself without a crash$`, func() error {
		s, err := m.big.Wait("ready once the memory is free", testpool.ReadyAfter(1))
		if err != nil {
			return err
		}
		return noCrash(s)
	})
}
