// Package engines runs the crash detection scenarios against real engine
// simulator processes under a real systemd, inside a sandbox.
package engines

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cucumber/godog"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/llorch/pool-managerd/internal/journal"
	lc "github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/shim"
	"github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/testkit/bdd/capture"
	"github.com/llorch/pool-managerd/internal/testkit/bdd/suite"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// The seed's crash detection scenarios.
const crashScenarios = 9

func TestMain(m *testing.M) {
	if shim.Is() {
		os.Exit(shim.Main())
	}
	os.Exit(sandbox.Main(m, testpool.Options, sandbox.Build(testpool.Sim)))
}

func TestCrashDetectionFeature(t *testing.T) {
	sandbox.Need(t)
	suite.Run(t, "crash detection", crashScenarios, initCrashDetection, "../features/supervision/crash_detection.feature")
}

// scenarioT lets testpool register cleanups that run after the scenario.
// Its Skip does not end a step, so each feature's test calls sandbox.Need
// before any scenario runs.
type scenarioT struct {
	godog.TestingT
	cleanups []func()
}

func (s *scenarioT) Helper()          {}
func (s *scenarioT) Cleanup(f func()) { s.cleanups = append(s.cleanups, f) }

type poolState struct {
	*testpool.Pool
	// baseline is the crash count and engine start count before the
	// latest fault, and the engine PID then.
	crashes uint64
	starts  int
	pid     int
	snap    supervisor.Snapshot
}

type world struct {
	t     *scenarioT
	env   *testpool.Env
	logs  *capture.Log
	pools map[string]*poolState
	first string
}

func (w *world) pool(name string) (*poolState, error) {
	if name == "" {
		name = w.first
	}
	p, ok := w.pools[name]
	if !ok {
		return nil, fmt.Errorf("no pool %q", name)
	}
	return p, nil
}

// mark remembers where the pool stands before a fault.
func (p *poolState) mark() {
	s := p.Snapshot()
	p.crashes, p.starts, p.pid = s.Policy.CrashCount, s.Starts, s.MainPID
}

func (w *world) crashEntry(pool string) (capture.Entry, error) {
	for _, e := range slices.Backward(w.logs.All()) {
		id := e.Fields[journal.MessageIDField]
		if e.Fields[journal.PoolID] == pool && (id == string(journal.MsgCrash) || id == string(journal.MsgOOM)) {
			return e, nil
		}
	}
	return capture.Entry{}, fmt.Errorf("no crash entry for pool %s", pool)
}

func initCrashDetection(sc *godog.ScenarioContext) { crashSteps(sc) }

// crashSteps registers the crash detection steps and returns their world.
func crashSteps(sc *godog.ScenarioContext) *world {
	w := &world{pools: map[string]*poolState{}}
	sc.After(func(ctx context.Context, _ *godog.Scenario, err error) (context.Context, error) {
		if w.t != nil {
			for _, f := range slices.Backward(w.t.cleanups) {
				f()
			}
		}
		return ctx, nil
	})

	sc.Step(`^a pool "([^"]+)" running the engine simulator on GPU (\d)(?: with MemoryMax=(\S+))?$`, func(ctx context.Context, id, gpu, mem string) {
		if w.env == nil {
			w.t = &scenarioT{TestingT: godog.T(ctx)}
			w.logs = capture.NewLog()
			w.env = testpool.New(w.t, w.logs)
		}
		// A one-second backoff keeps the crashed state observable.
		extra := "BackoffInitialSec=1\n"
		if mem != "" {
			extra += "[Scope]\nMemoryMax=" + mem + "\n"
		}
		w.pools[id] = &poolState{Pool: w.env.Pool(id, gpu, "", extra)}
		if w.first == "" {
			w.first = id
		}
	})
	isReady := func(name string) error {
		p, err := w.pool(name)
		if err != nil {
			return err
		}
		p.snap, err = p.Wait("ready", testpool.ReadyAfter(1))
		return err
	}
	sc.Step(`^the pool is ready$`, func() error { return isReady("") })
	sc.Step(`^pool "([^"]+)" is ready$`, isReady)

	fault := func(kind string) func(string) error {
		return func(name string) error {
			p, err := w.pool(name)
			if err != nil {
				return err
			}
			p.mark()
			return p.Fault(kind)
		}
	}
	sc.Step(`^the engine exits with status (\d+)$`, func(code int) error { return fault("exit:" + strconv.Itoa(code))("") })
	sc.Step(`^the engine stops answering its health check$`, func() error { return fault("hang-health")("") })
	sc.Step(`^the engine hits a CUDA error$`, func() error { return fault("cuda")("") })
	sc.Step(`^the engine dies of a segmentation fault$`, func() error { return fault("segv")("") })
	sc.Step(`^the engine of "([^"]+)" allocates memory until it is killed$`, fault("oom"))
	sc.Step(`^the engine process is killed with SIGKILL from outside$`, func() error {
		p, _ := w.pool("")
		p.mark()
		return syscall.Kill(p.pid, syscall.SIGKILL)
	})
	sc.Step(`^the engine runs for (\d+) seconds? and exits with status (\d+)$`, func(secs, code int) error {
		p, _ := w.pool("")
		// Uptime is real time here: wait until the engine has been up
		// that long.
		if d := time.Until(p.snap.ReadyAt.Add(time.Duration(secs) * time.Second)); d > 0 {
			time.Sleep(d)
		}
		err := fault("exit:" + strconv.Itoa(code))("")
		if err != nil {
			now := p.Snapshot()
			return fmt.Errorf("%w (pool %s, %d starts, last error %q)", err, now.State, now.Starts, now.LastError)
		}
		return nil
	})

	crashed := func(name, reason string) error {
		p, err := w.pool(name)
		if err != nil {
			return err
		}
		p.snap, err = p.Wait("a crash", func(s supervisor.Snapshot) bool { return s.Policy.CrashCount > p.crashes })
		if err != nil {
			return err
		}
		if string(p.snap.LastReason) != reason {
			return fmt.Errorf("crash reason %q (%s), want %q", p.snap.LastReason, p.snap.LastError, reason)
		}
		if p.snap.Ready || p.snap.Live {
			return fmt.Errorf("crashed pool is live=%t ready=%t", p.snap.Live, p.snap.Ready)
		}
		return nil
	}
	sc.Step(`^the supervisor detects a crash with reason "([^"]+)"$`, func(r string) error { return crashed("", r) })
	sc.Step(`^the supervisor detects a crash of "([^"]+)" with reason "([^"]+)"$`, crashed)
	sc.Step(`^the pool's last error says "([^"]+)"$`, func(s string) error {
		p, _ := w.pool("")
		if !strings.Contains(p.snap.LastError, s) {
			return fmt.Errorf("last error %q does not say %q", p.snap.LastError, s)
		}
		return nil
	})
	readyAgain := func(name string) error {
		p, err := w.pool(name)
		if err != nil {
			return err
		}
		p.snap, err = p.Wait("ready again", func(s supervisor.Snapshot) bool {
			return s.Ready && s.Starts > p.starts && s.MainPID != p.pid
		})
		if err == nil {
			p.mark()
		}
		return err
	}
	sc.Step(`^the pool is ready again on a new engine process$`, func() error { return readyAgain("") })
	sc.Step(`^the pool "([^"]+)" is ready again on a new engine process$`, readyAgain)
	sc.Step(`^3 failed health probes were recorded, each with its time$`, func() error {
		p, _ := w.pool("")
		f := p.snap.HealthFailures
		if len(f) != 3 {
			return fmt.Errorf("%d failed probes recorded", len(f))
		}
		for i := 1; i < len(f); i++ {
			if !f[i].After(f[i-1]) {
				return fmt.Errorf("probe times not increasing: %v", f)
			}
		}
		return nil
	})
	sc.Step(`^the journal of the engine's scope shows "([^"]+)"$`, func(s string) error {
		p, _ := w.pool("")
		deadline := time.Now().Add(20 * time.Second)
		for {
			out, err := exec.Command("journalctl", "-u", p.snap.Unit, "--no-pager", "-o", "cat").CombinedOutput()
			if err == nil && strings.Contains(string(out), s) {
				return nil
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("journalctl -u %s does not show %q: %s", p.snap.Unit, s, out)
			}
			time.Sleep(100 * time.Millisecond)
		}
	})
	sc.Step(`^the pool is neither live nor ready$`, func() error {
		p, _ := w.pool("")
		var err error
		p.snap, err = p.Wait("the crash", func(s supervisor.Snapshot) bool { return s.Policy.CrashCount > p.crashes })
		if err == nil && (p.snap.Live || p.snap.Ready) {
			err = fmt.Errorf("pool is live=%t ready=%t after the crash", p.snap.Live, p.snap.Ready)
		}
		return err
	})
	sc.Step(`^the pool state is "([^"]+)"$`, func(name string) error {
		p, _ := w.pool("")
		want, err := lc.ParseState(name)
		if err != nil {
			return err
		}
		if p.snap.State != want {
			return fmt.Errorf("pool state is %q, want %q", p.snap.State, want)
		}
		return nil
	})
	sc.Step(`^the pool state becomes "([^"]+)"$`, func(name string) error {
		p, _ := w.pool("")
		want, err := lc.ParseState(name)
		if err != nil {
			return err
		}
		p.snap, err = p.Wait("state "+name, func(s supervisor.Snapshot) bool { return s.State == want })
		return err
	})
	sc.Step(`^the crash count is (\d+)$`, func(n int) error {
		p, _ := w.pool("")
		if got := p.Snapshot().Policy.CrashCount; got != uint64(n) {
			return fmt.Errorf("crash count is %d, want %d", got, n)
		}
		return nil
	})
	sc.Step(`^no restart is scheduled$`, func() error {
		p, _ := w.pool("")
		s := p.Snapshot()
		if !s.NextRestart.IsZero() || s.Live || s.State != lc.Stopped {
			return fmt.Errorf("pool %+v", s)
		}
		return nil
	})
	sc.Step(`^the journal says "([^"]+)"$`, func(msg string) error {
		for _, e := range w.logs.All() {
			if e.Fields[journal.PoolID] == w.first && e.Msg == msg {
				return nil
			}
		}
		return fmt.Errorf("no log entry %q", msg)
	})
	sc.Step(`^the pool is started again$`, func() error {
		p, _ := w.pool("")
		p.mark()
		if err := p.Start(); err != nil {
			return err
		}
		var err error
		p.snap, err = p.Wait("ready", func(s supervisor.Snapshot) bool { return s.Ready && s.Starts > p.starts })
		return err
	})
	sc.Step(`^the crash entry in the journal has fields:$`, func(t *godog.Table) error {
		e, err := w.crashEntry(w.first)
		if err != nil {
			return err
		}
		for _, r := range t.Rows {
			k, v := r.Cells[0].Value, r.Cells[1].Value
			if k == journal.MessageIDField && v == "crash" {
				v = string(journal.MsgCrash)
			}
			if e.Fields[k] != v {
				return fmt.Errorf("crash entry %s=%q, want %q (entry %v)", k, e.Fields[k], v, e.Fields)
			}
		}
		return nil
	})
	sc.Step(`^the crash entry's UPTIME_SEC is at least (\d+)$`, func(n int) error {
		e, err := w.crashEntry(w.first)
		if err != nil {
			return err
		}
		up, err := strconv.Atoi(e.Fields[journal.UptimeSec])
		if err != nil || up < n {
			return fmt.Errorf("UPTIME_SEC=%q, want at least %d", e.Fields[journal.UptimeSec], n)
		}
		return nil
	})
	sc.Step(`^the crash entry names the model$`, func() error {
		e, err := w.crashEntry(w.first)
		if err != nil {
			return err
		}
		p, _ := w.pool("")
		if e.Fields[journal.Model] == "" || e.Fields[journal.Model] != p.snap.Model {
			return fmt.Errorf("MODEL=%q, want %q", e.Fields[journal.Model], p.snap.Model)
		}
		return nil
	})
	sc.Step(`^the crash entry in the journal has EXIT_SIGNAL "([^"]+)"$`, func(sig string) error {
		e, err := w.crashEntry(w.first)
		if err != nil {
			return err
		}
		if e.Fields[journal.ExitSignal] != sig {
			return fmt.Errorf("EXIT_SIGNAL=%q, want %q", e.Fields[journal.ExitSignal], sig)
		}
		return nil
	})
	sc.Step(`^the metric (\S+) is (\S+)$`, func(s string, want float64) error { return metricIs(w.env.Reg, s, want) })
	sc.Step(`^the journal has a critical \(PRIORITY=2\) "OOM" entry for pool "([^"]+)"$`, func(pool string) error {
		e, err := w.crashEntry(pool)
		if err != nil {
			return err
		}
		if e.Fields[journal.MessageIDField] != string(journal.MsgOOM) || e.Level != journal.LevelCritical {
			return errors.New("the crash entry is not a critical OOM entry: " + fmt.Sprint(e.Level, e.Fields))
		}
		return nil
	})
	return w
}

func execOut(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// metricIs checks a counter or gauge series, named as in the exposition
// format.
func metricIs(g prometheus.Gatherer, s string, want float64) error {
	m, typ, err := capture.Series(g, s)
	if err != nil {
		return err
	}
	v, err := capture.Value(m, typ)
	if err == nil && v != want {
		err = fmt.Errorf("%s is %g, want %g", s, v, want)
	}
	return err
}
