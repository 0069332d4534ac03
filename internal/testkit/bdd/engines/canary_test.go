package engines

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/cucumber/godog"

	"github.com/llorch/pool-managerd/internal/crash"
	"github.com/llorch/pool-managerd/internal/health"
	"github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/testkit/bdd/capture"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// canaryWorld is what the canary steps keep: when the engine was first
// seen to have generated.
type canaryWorld struct {
	generatedAt time.Time
	tokens      float64
}

func canarySteps(sc *godog.ScenarioContext, w *lifecycle) {
	c := &canaryWorld{}
	tokens := func() (float64, error) {
		_, tok, err := health.Progress(context.Background(), fmt.Sprintf("http://127.0.0.1:%d/metrics", w.pool.Port), time.Second, nil)
		return tok, err
	}
	sc.Step(`^a ready pool "llama8b" sent the canary "(\S+) (\S+)" after (\d+) seconds? unused$`, func(ctx context.Context, method, path string, n int) error {
		w.t = &scenarioT{TestingT: godog.T(ctx)}
		w.logs = capture.NewLog()
		w.env = testpool.New(w.t, w.logs)
		// One token a canary: the engine's token count is the canaries'.
		extra := fmt.Sprintf("[Health]\nCanaryRequest=%s %s {\"prompt\":\"Hi\",\"n_predict\":1}\nCanaryIdleSec=%d\nCanaryTimeoutSec=2\n", method, path, n)
		w.pool = w.env.Start(testpool.Spec{ID: "llama8b", Devices: "0", Extra: extra})
		var err error
		w.first, err = w.pool.Wait("ready", testpool.ReadyAfter(1))
		w.beforeFault = w.first
		return err
	})
	sc.Step(`^the pool is left unused until the engine generates$`, func() error {
		for end := time.Now().Add(20 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			tok, err := tokens()
			if err != nil {
				return err
			}
			if tok > 0 {
				c.generatedAt, c.tokens = time.Now(), tok
				return nil
			}
			if time.Now().After(end) {
				return errors.New("no canary within 20 s of an unused pool")
			}
		}
	})
	// The canary's idle time counts from the engine's first good probe,
	// a moment before the pool is marked ready: hence the 100 ms.
	sc.Step(`^the engine generated (\d+) tokens?, the canary's, at least (\d+) seconds? after the pool became ready$`, func(n, sec int) error {
		if c.tokens != float64(n) {
			return fmt.Errorf("the engine generated %v tokens, want %d", c.tokens, n)
		}
		if d := c.generatedAt.Sub(w.first.ReadyAt); d < time.Duration(sec)*time.Second-100*time.Millisecond {
			return fmt.Errorf("the canary came %s after the pool became ready", d)
		}
		return nil
	})
	sc.Step(`^(\d+) failed canaries restart the engine as "([^"]+)", good health probes between them resetting nothing$`, func(n int, reason string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		// Follow the run of failures to the crash: it only grows, while
		// the engine's /health keeps answering between canaries.
		var firstFailure time.Time
		var kept bool
		most := 0
		s, err := w.pool.Supervisor.Wait(ctx, func(s supervisor.Snapshot) bool {
			if s.Policy.CrashCount > 0 {
				return true
			}
			k := len(s.HealthFailures)
			if k < most {
				return true
			}
			most = k
			if k > 0 && firstFailure.IsZero() {
				firstFailure = s.HealthFailures[0]
			}
			if !firstFailure.IsZero() && s.LastHeartbeat.After(firstFailure) && k > 0 {
				kept = true
			}
			return false
		})
		if err != nil {
			return fmt.Errorf("no crash: %v", err)
		}
		if s.Policy.CrashCount == 0 {
			return fmt.Errorf("the run of failed probes fell from %d to %d without a crash", most, len(s.HealthFailures))
		}
		if s.Policy.CrashCount != 1 || s.LastReason != crash.Reason(reason) {
			return fmt.Errorf("%d crashes, the last %q, want 1 %q", s.Policy.CrashCount, s.LastReason, reason)
		}
		if !kept {
			return errors.New("no good health probe was seen after the first failed canary while its failure was kept")
		}
		want := fmt.Sprintf("health check failed %d times (canary request failed: ", n)
		if !strings.Contains(s.LastError, want) || !strings.Contains(s.LastError, "answered 500") {
			return fmt.Errorf("last error %q, want it to say %q ... answered 500", s.LastError, want)
		}
		_, err = w.pool.Wait("ready again", testpool.ReadyAfter(2))
		return err
	})
}
