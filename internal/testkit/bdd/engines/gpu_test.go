package engines

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cucumber/godog"

	lc "github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/testkit/bdd/capture"
	"github.com/llorch/pool-managerd/internal/testkit/bdd/suite"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

const gpuScenarios = 4

func TestGPUFaultsFeature(t *testing.T) {
	sandbox.Need(t)
	suite.Run(t, "GPU faults", gpuScenarios, initGPUFaults, "../features/serving/gpu_faults.feature")
}

// testpool's static inventory.
var gpuUUIDs = []string{"GPU-8f2c1a70-0000-4000-8000-000000000000", "GPU-8f2c1a70-0000-4000-8000-000000000001"}

func initGPUFaults(sc *godog.ScenarioContext) {
	w := crashSteps(sc)
	var holder *exec.Cmd
	env := func(ctx context.Context) {
		if w.env == nil {
			w.t = &scenarioT{TestingT: godog.T(ctx)}
			w.logs = capture.NewLog()
			w.env = testpool.New(w.t, w.logs)
		}
	}
	sc.Before(func(ctx context.Context, _ *godog.Scenario) (context.Context, error) {
		holder = nil
		return ctx, nil
	})
	add := func(ctx context.Context, id string, gpus []int, start bool) error {
		// A start held by another process looks again every 300 ms here.
		env(ctx)
		var ds []string
		for _, g := range gpus {
			ds = append(ds, strconv.Itoa(g))
		}
		p := w.env.Start(testpool.Spec{ID: id, Devices: strings.Join(ds, " "), Extra: "BackoffInitialSec=1\n", NoStart: !start,
			GPURetry: 300 * time.Millisecond})
		w.pools[id] = &poolState{Pool: p}
		if w.first == "" {
			w.first = id
		}
		return nil
	}
	sc.Step(`^a pool "([^"]+)" running the engine simulator on GPUs (\d) and (\d)$`, func(ctx context.Context, id string, a, b int) error {
		return add(ctx, id, []int{a, b}, true)
	})
	// The pools on GPU g, by their device mask ("0", "0,1").
	on := func(g int) []*poolState {
		var out []*poolState
		for _, p := range w.pools {
			if slices.Contains(strings.Split(p.Snapshot().DeviceMask, ","), strconv.Itoa(g)) {
				out = append(out, p)
			}
		}
		return out
	}
	sc.Step(`^NVML reports XID (\d+) on GPU (\d)$`, func(xid, g int) {
		var sups []*supervisor.Supervisor
		for _, p := range on(g) {
			p.mark()
			sups = append(sups, p.Supervisor)
		}
		supervisor.RouteXID(gpuUUIDs[g], uint64(xid), sups)
	})
	sc.Step(`^NVML reports GPU (\d) usable again$`, func(g int) {
		for _, p := range on(g) {
			p.GPUUsable(gpuUUIDs[g])
		}
	})
	sc.Step(`^pool "([^"]+)" is held failed with the last error "([^"]+)"$`, func(id, want string) error {
		p, err := w.pool(id)
		if err != nil {
			return err
		}
		s, err := p.Wait("failed", func(s supervisor.Snapshot) bool { return s.State == lc.Failed && !s.Live })
		if err != nil {
			return err
		}
		if !strings.Contains(s.LastError, want) {
			return fmt.Errorf("last error %q, want it to say %q", s.LastError, want)
		}
		p.snap = s
		return nil
	})
	sc.Step(`^pool "([^"]+)" is not restarted for (\d+) seconds?$`, func(id string, secs int) error {
		p, _ := w.pool(id)
		ctx, cancel := context.WithTimeout(context.Background(), time.Duration(secs)*time.Second)
		defer cancel()
		before := p.snap
		s, err := p.Supervisor.Wait(ctx, func(s supervisor.Snapshot) bool { return s.Starts != before.Starts || s.State != lc.Failed })
		if err == nil {
			return fmt.Errorf("the pool moved: %s, %d starts (was %d)", s.State, s.Starts, before.Starts)
		}
		if !errors.Is(err, context.DeadlineExceeded) {
			return err
		}
		return nil
	})
	sc.Step(`^pool "([^"]+)" stays ready on the same engine process for (\d+) seconds?$`, func(id string, secs int) error {
		p, err := w.pool(id)
		if err != nil {
			return err
		}
		p.mark()
		ctx, cancel := context.WithTimeout(context.Background(), time.Duration(secs)*time.Second)
		defer cancel()
		s, err := p.Supervisor.Wait(ctx, func(s supervisor.Snapshot) bool {
			return s.Policy.CrashCount != p.crashes || s.MainPID != p.pid || !s.Ready
		})
		if err == nil {
			return fmt.Errorf("pool %s changed: ready=%t, pid %d (was %d), last error %q", id, s.Ready, s.MainPID, p.pid, s.LastError)
		}
		if !errors.Is(err, context.DeadlineExceeded) {
			return err
		}
		return nil
	})
	sc.Step(`^a process outside any pool holds GPU (\d)'s device node$`, func(ctx context.Context, g int) {
		env(ctx)
		holder = sandbox.HoldNode(w.t, fmt.Sprintf("/dev/nvidia%d", g))
	})
	sc.Step(`^a pool "([^"]+)" is started on GPU (\d)$`, func(ctx context.Context, id string, g int) error {
		if err := add(ctx, id, []int{g}, false); err != nil {
			return err
		}
		err := w.pools[id].Start()
		if !errors.Is(err, lc.ErrGPUBusy) {
			return fmt.Errorf("the start answered %v, want a GPU in use", err)
		}
		return nil
	})
	sc.Step(`^pool "([^"]+)" is held failed with the last error naming the holder's PID$`, func(id string) error {
		p, _ := w.pool(id)
		s := p.Snapshot()
		want := fmt.Sprintf("in use by pid %d", holder.Process.Pid)
		if s.State != lc.Failed || !strings.Contains(s.LastError, want) {
			return fmt.Errorf("pool %s, last error %q, want failed and %q", s.State, s.LastError, want)
		}
		return nil
	})
	sc.Step(`^the crash count of "([^"]+)" is (\d+)$`, func(id string, n int) error {
		p, _ := w.pool(id)
		if got := p.Snapshot().Policy.CrashCount; got != uint64(n) {
			return fmt.Errorf("crash count %d, want %d", got, n)
		}
		return nil
	})
	sc.Step(`^the process holding GPU (\d) exits$`, func(int) error {
		if err := holder.Process.Kill(); err != nil {
			return err
		}
		holder.Wait()
		return nil
	})
}
