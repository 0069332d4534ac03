package engines

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/cucumber/godog"

	"github.com/llorch/pool-managerd/internal/health"
	"github.com/llorch/pool-managerd/internal/journal"
	lc "github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/testkit/bdd/capture"
	"github.com/llorch/pool-managerd/internal/testkit/bdd/suite"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// Serving health: stalls and warm-up.
const servingScenarios = 6

func TestServingHealthFeature(t *testing.T) {
	sandbox.Need(t)
	suite.Run(t, "serving health", servingScenarios, initServing, "../features/serving/serving_health.feature")
}

func initServing(sc *godog.ScenarioContext) {
	w := crashSteps(sc)
	var faultAt time.Time
	sc.Step(`^a pool "([^"]+)" running the engine simulator on GPU (\d) with (stall detection after 1 second|a warm-up request taking 1 second|a warm-up request the engine refuses)$`,
		func(ctx context.Context, id, gpu, what string) {
			if w.env == nil {
				w.t = &scenarioT{TestingT: godog.T(ctx)}
				w.logs = capture.NewLog()
				w.env = testpool.New(w.t, w.logs)
			}
			extra, sim := "BackoffInitialSec=1\n", ""
			switch what {
			case "stall detection after 1 second":
				extra += "[Health]\nProgressURL=http://127.0.0.1:%p/metrics\nStallSec=1\n"
			case "a warm-up request taking 1 second":
				// Two tokens at half a second each.
				extra += "[Health]\nWarmupRequest=POST /completion {\"prompt\":\"Hi\",\"n_predict\":2}\n"
				sim = "--token-time 500ms"
			default:
				extra += "[Health]\nWarmupRequest=POST /completion {\"prompt\":\"Hi\",\"n_predict\":1}\n"
				sim = "--fault fail-completion"
			}
			w.pools[id] = &poolState{Pool: w.env.Pool(id, gpu, sim, extra)}
			if w.first == "" {
				w.first = id
			}
		})
	fault := func(kind string) func() error {
		return func() error {
			p, err := w.pool("")
			if err != nil {
				return err
			}
			p.mark()
			faultAt = time.Now()
			return p.Fault(kind)
		}
	}
	sc.Step(`^the engine stalls with a request in flight$`, fault("stall"))
	sc.Step(`^the engine is busy, slow but producing tokens$`, fault("busy"))
	sc.Step(`^the engine's metrics endpoint stops answering$`, fault("no-metrics"))
	sc.Step(`^the engine's metrics endpoint stops answering in time$`, fault("hang-metrics"))
	sc.Step(`^the pool has read the engine's metrics for a second$`, func() {
		// Real time: the pool reads the engine's metrics every interval
		// (0.2 s here), and must have seen its work in flight.
		time.Sleep(time.Second)
	})

	sc.Step(`^the supervisor detects a crash with reason "([^"]+)" within (\d+) seconds of the stall$`, func(reason string, secs int) error {
		p, _ := w.pool("")
		s, err := p.Wait("a crash", func(s supervisor.Snapshot) bool { return s.Policy.CrashCount > p.crashes })
		took := time.Since(faultAt)
		p.snap = s
		switch {
		case err != nil:
			return err
		case string(s.LastReason) != reason:
			return fmt.Errorf("crash reason %q, want %q (%s)", s.LastReason, reason, s.LastError)
		case took > time.Duration(secs)*time.Second:
			return fmt.Errorf("the stall was detected %s after it began, want within %ds", took.Round(time.Millisecond), secs)
		}
		return nil
	})
	sc.Step(`^the pool stays ready on the same engine process for (\d+) seconds$`, func(secs int) error {
		p, _ := w.pool("")
		// An absence over time: watched throughout, not slept through.
		ctx, cancel := context.WithTimeout(context.Background(), time.Duration(secs)*time.Second)
		defer cancel()
		s, err := p.Supervisor.Wait(ctx, func(s supervisor.Snapshot) bool {
			return s.Policy.CrashCount != p.crashes || s.MainPID != p.pid || !s.Ready
		})
		if err == nil {
			return fmt.Errorf("the pool changed: ready=%t pid %d (was %d), crashes %d (was %d), last error %q",
				s.Ready, s.MainPID, p.pid, s.Policy.CrashCount, p.crashes, s.LastError)
		}
		if !errors.Is(err, context.DeadlineExceeded) {
			return err
		}
		return nil
	})
	sc.Step(`^the pool is "warming" before it is ready$`, func() error {
		p, _ := w.pool("")
		s, err := p.Wait("warming", func(s supervisor.Snapshot) bool { return s.State == lc.Warming || s.Ready })
		if err != nil {
			return err
		}
		if s.State != lc.Warming {
			return fmt.Errorf("the pool was %s before it warmed up", s.State)
		}
		if s.Ready {
			return errors.New("Ready while warming")
		}
		p.snap, err = p.Wait("ready", testpool.ReadyAfter(1))
		return err
	})
	sc.Step(`^the engine answered the warm-up request before the pool was ready$`, func() error {
		p, _ := w.pool("")
		_, tokens, err := health.Progress(context.Background(), fmt.Sprintf("http://127.0.0.1:%d/metrics", p.Port), 5*time.Second, nil)
		if err != nil {
			return err
		}
		if tokens != 2 {
			return fmt.Errorf("the engine produced %g tokens, want the warm-up's 2", tokens)
		}
		return nil
	})
	sc.Step(`^the pool has never been ready$`, func() error {
		p, _ := w.pool("")
		for _, e := range w.logs.All() {
			if e.Fields[journal.PoolID] == p.ID && strings.HasPrefix(e.Msg, "engine ready") {
				return errors.New("the pool was ready once")
			}
		}
		if s := p.Snapshot(); !s.ReadyAt.IsZero() {
			return fmt.Errorf("ready at %s", s.ReadyAt)
		}
		return nil
	})
}
