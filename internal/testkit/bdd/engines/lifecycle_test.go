package engines

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cucumber/godog"
	dto "github.com/prometheus/client_model/go"

	"github.com/llorch/pool-managerd/internal/journal"
	lc "github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/testkit/bdd/capture"
	"github.com/llorch/pool-managerd/internal/testkit/bdd/suite"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// The lifecycle scenarios: drain (10), reload (14), pools on demand (8).
const lifecycleScenarios = 32

func TestLifecycleFeatures(t *testing.T) {
	sandbox.Need(t)
	suite.Run(t, "lifecycle", lifecycleScenarios, initLifecycle, "../features/lifecycle")
}

type drainCall struct {
	start time.Time
	done  chan struct{}
	res   lc.DrainResult
	err   error
}

type reloadCall struct {
	start time.Time
	done  chan struct{}
	model string
	err   error
	took  time.Duration
}

type lifecycle struct {
	t    *scenarioT
	env  *testpool.Env
	logs *capture.Log
	pool *testpool.Pool
	// first is the pool's state when it first became ready.
	first       supervisor.Snapshot
	beforeFault supervisor.Snapshot
	leases      []string
	released    []string
	lastRelease time.Time
	drain       *drainCall
	reload      *reloadCall
	versionFile string
}

func (w *lifecycle) modelPath(name string) string { return filepath.Join(w.env.Dir, "models", name) }

func (w *lifecycle) waitDrain() error {
	if w.drain == nil {
		return errors.New("no drain was requested")
	}
	select {
	case <-w.drain.done:
		return w.drain.err
	case <-time.After(60 * time.Second):
		return errors.New("the drain did not complete within a minute")
	}
}

func (w *lifecycle) waitReload() error {
	if w.reload == nil {
		return errors.New("no reload was requested")
	}
	select {
	case <-w.reload.done:
		return nil
	case <-time.After(90 * time.Second):
		return errors.New("the reload did not return within 90 s")
	}
}

func sha(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:]), nil
}

func (w *lifecycle) served() (string, error) {
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/v1/models", w.pool.Port))
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var out struct {
		Data []struct {
			ID string `json:"id"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || len(out.Data) == 0 {
		return "", fmt.Errorf("no model served: %v", err)
	}
	return out.Data[0].ID, nil
}

func alive(pid int) bool { return pid > 0 && syscall.Kill(pid, 0) == nil }

func initLifecycle(sc *godog.ScenarioContext) {
	w := &lifecycle{}
	sc.After(func(ctx context.Context, _ *godog.Scenario, err error) (context.Context, error) {
		if w.reload != nil {
			w.waitReload()
		}
		if w.t != nil {
			for _, f := range slices.Backward(w.t.cleanups) {
				f()
			}
		}
		return ctx, nil
	})

	start := func(ctx context.Context, ref string) error {
		w.t = &scenarioT{TestingT: godog.T(ctx)}
		w.logs = capture.NewLog()
		w.env = testpool.New(w.t, w.logs)
		spec := testpool.Spec{ID: "llama8b", Devices: "0"}
		if ref != "" {
			w.env.WriteModel(ref, "GGUF\x03\x00\x00\x00 model A")
			w.versionFile = filepath.Join(w.env.Dir, "engine-version")
			if err := os.WriteFile(w.versionFile, []byte("sim-1\n"), 0o644); err != nil {
				return err
			}
			spec.Model = ref
			spec.Engine = "VersionCommand=/bin/cat " + w.versionFile + "\nStopTimeoutSec=2\n"
			spec.Extra = "[Health]\nStartTimeoutSec=3\n"
		}
		w.pool = w.env.Start(spec)
		var err error
		w.first, err = w.pool.Wait("ready", testpool.ReadyAfter(1))
		w.beforeFault = w.first
		return err
	}
	onDemandSteps(sc, w)
	groupSteps(sc, w)
	canarySteps(sc, w)
	memorySteps(sc, w)
	sc.Step(`^a ready pool "llama8b" running the engine simulator$`, func(ctx context.Context) error { return start(ctx, "") })
	sc.Step(`^a ready pool "llama8b" running the engine simulator on model "([^"]+)"$`, start)
	sc.Step(`^a model "([^"]+)" is available$`, func(name string) {
		w.env.WriteModel(name, "GGUF\x03\x00\x00\x00 model "+name)
	})
	sc.Step(`^model "([^"]+)" takes (\d+) seconds? to load$`, func(name string, n int) {
		w.env.WriteModel(name, fmt.Sprintf("GGUF\x03\x00\x00\x00\nsim-load-time=%ds\n", n))
	})
	sc.Step(`^a file "([^"]+)" that is not a GGUF model$`, func(name string) {
		w.env.WriteModel(name, "PK\x03\x04 this is a zip, not a model")
	})
	sc.Step(`^a model "([^"]+)" that makes the engine stop answering its health check$`, func(name string) {
		w.env.WriteModel(name, "GGUF\x03\x00\x00\x00\nsim-fault=hang-health\n")
	})
	sc.Step(`^the engine binary is upgraded to version "([^"]+)"$`, func(v string) error {
		return os.WriteFile(w.versionFile, []byte("version: "+v+"\n"), 0o644)
	})

	// Leases.
	sc.Step(`^the router holds (\d+) leases? on the pool$`, func(n int) error {
		for range n {
			id, err := w.pool.AcquireLease("router-1")
			if err != nil {
				return err
			}
			w.leases = append(w.leases, id)
		}
		return nil
	})
	sc.Step(`^the router releases (\d+) leases?$`, func(n int) error {
		for range n {
			if len(w.leases) == 0 {
				return errors.New("the router holds no lease")
			}
			id := w.leases[0]
			w.leases = w.leases[1:]
			if err := w.pool.ReleaseLease(id); err != nil {
				return err
			}
			w.lastRelease = time.Now()
			w.released = append(w.released, id)
		}
		return nil
	})
	sc.Step(`^a new lease is refused because the pool is draining$`, func() error {
		_, err := w.pool.AcquireLease("router-2")
		if !errors.Is(err, lc.ErrDraining) {
			return fmt.Errorf("lease not refused as draining: %v", err)
		}
		return nil
	})
	sc.Step(`^the pool has (\d+) active leases?$`, func(n int) error {
		if got := w.pool.Snapshot().ActiveLeases; got != uint32(n) {
			return fmt.Errorf("%d active leases, want %d", got, n)
		}
		return nil
	})
	sc.Step(`^releasing the router's lease now is refused as an unknown lease$`, func() error {
		if len(w.leases) == 0 {
			return errors.New("the router holds no lease")
		}
		err := w.pool.ReleaseLease(w.leases[0])
		if !errors.Is(err, lc.ErrNoSuchLease) {
			return fmt.Errorf("release of a revoked lease: %v", err)
		}
		if got := w.pool.Snapshot().ActiveLeases; got != 0 {
			return fmt.Errorf("%d active leases after the refused release", got)
		}
		return nil
	})

	// Drains.
	sc.Step(`^a drain is requested with a deadline of (\d+) ms$`, func(ms int) error {
		d := &drainCall{start: time.Now(), done: make(chan struct{})}
		w.drain = d
		go func() {
			defer close(d.done)
			d.res, d.err = w.pool.Drain(context.Background(), time.Duration(ms)*time.Millisecond)
		}()
		// The drain's first effects are immediate; wait for them.
		_, err := w.pool.Wait("the drain to begin", func(s supervisor.Snapshot) bool { return s.Draining || s.State == lc.Stopped })
		return err
	})
	sc.Step(`^the pool is draining$`, func() error {
		s, err := w.pool.Wait("draining", func(s supervisor.Snapshot) bool { return s.Draining })
		if err == nil && s.Ready {
			err = errors.New("a draining pool is ready")
		}
		return err
	})
	sc.Step(`^the pool is not draining$`, func() error {
		if w.pool.Snapshot().Draining {
			return errors.New("the pool is draining")
		}
		return nil
	})
	sc.Step(`^the drain has not completed$`, func() error {
		select {
		case <-w.drain.done:
			return fmt.Errorf("the drain completed: %+v", w.drain.res)
		default:
		}
		if !w.pool.Snapshot().Live {
			return errors.New("the engine was stopped while leases remain")
		}
		return nil
	})
	sc.Step(`^the drain completes with outcome "([^"]+)"$`, func(want string) error {
		if err := w.waitDrain(); err != nil {
			return err
		}
		if w.drain.res.Outcome != want {
			return fmt.Errorf("drain outcome %q, want %q", w.drain.res.Outcome, want)
		}
		return nil
	})
	sc.Step(`^the drain completed within (\d+) ms of the last lease release$`, func(ms int) error {
		r := w.drain.res
		if r.LeasesDrainedAt.IsZero() {
			return errors.New("the leases did not drain")
		}
		if d := r.LeasesDrainedAt.Sub(w.lastRelease); d > time.Duration(ms)*time.Millisecond {
			return fmt.Errorf("drain finished its lease phase %s after the last release", d)
		}
		return nil
	})
	sc.Step(`^the lease phase of the drain took under (\d+) ms$`, func(ms int) error {
		if d := w.drain.res.LeasesDrainedAt.Sub(w.drain.start); d > time.Duration(ms)*time.Millisecond {
			return fmt.Errorf("the lease phase took %s", d)
		}
		return nil
	})
	sc.Step(`^the drain took at least (\d+) ms$`, func(ms int) error {
		if d := w.drain.res.Done.Sub(w.drain.start); d < time.Duration(ms)*time.Millisecond {
			return fmt.Errorf("the drain took %s", d)
		}
		return nil
	})
	sc.Step(`^the engine still serves requests$`, func() error {
		_, err := w.served()
		return err
	})
	sc.Step(`^the engine process is still running$`, func() error {
		if !alive(w.first.MainPID) {
			return fmt.Errorf("engine %d is gone", w.first.MainPID)
		}
		return nil
	})
	sc.Step(`^the engine process is gone$`, func() error {
		if alive(w.first.MainPID) {
			return fmt.Errorf("engine %d still runs", w.first.MainPID)
		}
		return nil
	})
	sc.Step(`^the engine's scope is not active$`, func() error {
		out, _ := execOut("systemctl", "is-active", w.first.Unit)
		if out == "active" {
			return fmt.Errorf("%s is active", w.first.Unit)
		}
		return nil
	})
	sc.Step(`^the runtime record of the pool is removed$`, func() error {
		f := filepath.Join(w.env.Dir, "run", "pools", "llama8b.json")
		if _, err := os.Stat(f); !os.IsNotExist(err) {
			return fmt.Errorf("%s still exists (%v)", f, err)
		}
		return nil
	})
	sc.Step(`^the pool is neither live nor ready$`, func() error {
		s := w.pool.Snapshot()
		if s.Live || s.Ready {
			return fmt.Errorf("pool live=%t ready=%t", s.Live, s.Ready)
		}
		return nil
	})
	sc.Step(`^the pool state is "([^"]+)"$`, func(name string) error {
		want, err := lc.ParseState(name)
		if err != nil {
			return err
		}
		if s := w.pool.Snapshot().State; s != want {
			return fmt.Errorf("pool state %q, want %q", s, want)
		}
		return nil
	})
	sc.Step(`^no restart is scheduled$`, func() error {
		s := w.pool.Snapshot()
		if !s.NextRestart.IsZero() {
			return fmt.Errorf("a restart is scheduled at %s", s.NextRestart)
		}
		return nil
	})
	// The drain is seen to begin (Draining) a moment before its warning
	// is written.
	sc.Step(`^the journal has a warning for pool "([^"]+)" with ACTIVE_LEASES (\d+)$`, func(pool, n string) error {
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			for _, e := range w.logs.All() {
				if e.Fields[journal.PoolID] == pool && e.Fields[journal.ActiveLeases] == n && e.Level.String() == "WARN" {
					return nil
				}
			}
		}
		return fmt.Errorf("no warning with ACTIVE_LEASES=%s", n)
	})

	// Reloads.
	reload := func(ref string, deadline time.Duration, wait bool) error {
		r := &reloadCall{start: time.Now(), done: make(chan struct{})}
		w.reload = r
		w.beforeFault = w.pool.Snapshot()
		go func() {
			defer close(r.done)
			ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
			defer cancel()
			r.model, r.err = w.pool.Reload(ctx, ref, deadline)
			r.took = time.Since(r.start)
		}()
		if wait {
			return w.waitReload()
		}
		return nil
	}
	sc.Step(`^the pool is reloaded to "([^"]+)"$`, func(ref string) error { return reload(ref, 30*time.Second, true) })
	sc.Step(`^the pool is reloaded to "([^"]+)" in the background$`, func(ref string) error { return reload(ref, 30*time.Second, false) })
	sc.Step(`^the pool is reloaded to "([^"]+)" with a drain deadline of (\d+) ms$`, func(ref string, ms int) error {
		return reload(ref, time.Duration(ms)*time.Millisecond, true)
	})
	sc.Step(`^the reload succeeds with model "([^"]+)"$`, func(ref string) error {
		if err := w.waitReload(); err != nil {
			return err
		}
		if w.reload.err != nil {
			return fmt.Errorf("reload failed: %v", w.reload.err)
		}
		if w.reload.model != ref || w.pool.Snapshot().Model != ref {
			return fmt.Errorf("reload returned %q, pool model %q, want %q", w.reload.model, w.pool.Snapshot().Model, ref)
		}
		return nil
	})
	sc.Step(`^the reload fails saying it rolled back$`, func() error {
		if err := w.waitReload(); err != nil {
			return err
		}
		err := w.reload.err
		if !errors.Is(err, lc.ErrReloadFailed) || !strings.Contains(fmt.Sprint(err), "rolled back to model-a.gguf") {
			return fmt.Errorf("reload error %v does not say it rolled back", err)
		}
		return nil
	})
	sc.Step(`^the reload fails with a drain timeout$`, func() error {
		if err := w.waitReload(); err != nil {
			return err
		}
		if !errors.Is(w.reload.err, lc.ErrDrainTimeout) {
			return fmt.Errorf("reload error %v is not a drain timeout", w.reload.err)
		}
		return nil
	})
	sc.Step(`^the reload took at least (\d+) seconds?$`, func(n int) error {
		if w.reload.took < time.Duration(n)*time.Second {
			return fmt.Errorf("the reload took %s", w.reload.took)
		}
		return nil
	})
	sc.Step(`^the engine's health check answers ok$`, func() error {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/health", w.pool.Port))
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("health: %s", resp.Status)
		}
		return nil
	})
	sc.Step(`^the engine loaded a staged copy of "([^"]+)" named by its digest$`, func(name string) error {
		s := w.pool.Snapshot()
		digest, err := sha(w.modelPath(name))
		if err != nil {
			return err
		}
		want := filepath.Join(w.env.Dir, "state", "staged", strings.Replace(digest, ":", "-", 1), name)
		if s.StagedPath != want {
			return fmt.Errorf("staged path %q, want %q", s.StagedPath, want)
		}
		cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", s.MainPID))
		if err != nil || !strings.Contains(string(cmdline), want) {
			return fmt.Errorf("the engine was not started on %s: %q", want, cmdline)
		}
		return nil
	})
	sc.Step(`^the pool's model digest is the sha256 of "([^"]+)"$`, func(name string) error {
		digest, err := sha(w.modelPath(name))
		if err != nil {
			return err
		}
		if got := w.pool.Snapshot().ModelDigest; got != digest {
			return fmt.Errorf("model digest %q, want %q", got, digest)
		}
		return nil
	})
	sc.Step(`^the old engine process is gone$`, func() error {
		if alive(w.beforeFault.MainPID) {
			return fmt.Errorf("old engine %d still runs", w.beforeFault.MainPID)
		}
		return nil
	})
	sc.Step(`^the failed engine process is gone$`, func() error {
		s := w.pool.Snapshot()
		if s.Starts != w.beforeFault.Starts+2 {
			return fmt.Errorf("%d engine starts since the reload began, want 2 (new, then old again)", s.Starts-w.beforeFault.Starts)
		}
		out, _ := execOut("pgrep", "-c", "-f", "pool-engine-sim")
		if out != "1" {
			return fmt.Errorf("%s simulator processes run, want 1", out)
		}
		return nil
	})
	sc.Step(`^a new engine process runs$`, func() error {
		s := w.pool.Snapshot()
		if s.MainPID == w.beforeFault.MainPID || !alive(s.MainPID) {
			return fmt.Errorf("engine pid %d (before %d)", s.MainPID, w.beforeFault.MainPID)
		}
		return nil
	})
	sc.Step(`^the engine process is the same as before$`, func() error {
		s := w.pool.Snapshot()
		if s.MainPID != w.beforeFault.MainPID || !alive(s.MainPID) {
			return fmt.Errorf("engine pid %d, before %d", s.MainPID, w.beforeFault.MainPID)
		}
		return nil
	})
	sc.Step(`^the engine was started (\d+) times?$`, func(n int) error {
		if s := w.pool.Snapshot(); s.Starts != n {
			return fmt.Errorf("%d engine starts", s.Starts)
		}
		return nil
	})
	sc.Step(`^the engine serves "([^"]+)"$`, func(name string) error {
		got, err := w.served()
		if err == nil && got != name {
			err = fmt.Errorf("the engine serves %q, want %q", got, name)
		}
		return err
	})
	sc.Step(`^the pool is ready$`, func() error {
		if s := w.pool.Snapshot(); !s.Ready || s.State != lc.Ready {
			return fmt.Errorf("pool %s, ready=%t", s.State, s.Ready)
		}
		return nil
	})
	// The version command runs beside the engine's start: what it says
	// may come a moment after the engine is ready.
	sc.Step(`^the pool's engine version is "([^"]+)"$`, func(v string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		s, err := w.pool.Supervisor.Wait(ctx, func(s supervisor.Snapshot) bool { return s.EngineVersion == v })
		if err != nil {
			return fmt.Errorf("engine version %q, want %q", s.EngineVersion, v)
		}
		return nil
	})
	sc.Step(`^the pool's model is "([^"]+)"$`, func(m string) error {
		if got := w.pool.Snapshot().Model; got != m {
			return fmt.Errorf("model %q, want %q", got, m)
		}
		return nil
	})
	sc.Step(`^the runtime record says engine_version "([^"]+)" and model "([^"]+)"$`, func(v, m string) error {
		var err error
		for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			var rec supervisor.Record
			b, rerr := os.ReadFile(filepath.Join(w.env.Dir, "run", "pools", "llama8b.json"))
			if rerr == nil {
				rerr = json.Unmarshal(b, &rec)
			}
			s := w.pool.Snapshot()
			err = rerr
			if err == nil && (rec.EngineVersion != v || rec.Model != m || rec.PID != s.MainPID || rec.Digest != s.ModelDigest) {
				err = fmt.Errorf("runtime record %+v; pool pid %d digest %s", rec, s.MainPID, s.ModelDigest)
			}
			if err == nil || time.Now().After(deadline) {
				return err
			}
		}
	})
	sc.Step(`^the pool id is "([^"]+)"$`, func(id string) error {
		if got := w.pool.Snapshot().ID; got != id {
			return fmt.Errorf("pool id %q", got)
		}
		return nil
	})
	sc.Step(`^the pool's device mask is "([^"]+)"$`, func(m string) error {
		if got := w.pool.Snapshot().DeviceMask; got != m {
			return fmt.Errorf("device mask %q, want %q", got, m)
		}
		return nil
	})
	sc.Step(`^the engine's CUDA_VISIBLE_DEVICES is GPU 0's UUID$`, func() error {
		env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", w.pool.Snapshot().MainPID))
		if err != nil {
			return err
		}
		if !strings.Contains(string(env), "CUDA_VISIBLE_DEVICES=GPU-8f2c1a70-0000-4000-8000-000000000000\x00") {
			return errors.New("CUDA_VISIBLE_DEVICES is not GPU 0's UUID")
		}
		return nil
	})

	// Metrics.
	sc.Step(`^the metric (\S+) is (\S+)$`, func(s string, want float64) error { return metricIs(w.env.Reg, s, want) })
	sc.Step(`^the metric (\S+) has (\d+) observations?$`, func(s string, n int) error {
		m, typ, err := capture.Series(w.env.Reg, s)
		if err != nil {
			return err
		}
		if typ != dto.MetricType_HISTOGRAM || int(m.GetHistogram().GetSampleCount()) != n {
			return fmt.Errorf("%s: %d observations, want %d", s, m.GetHistogram().GetSampleCount(), n)
		}
		return nil
	})
}
