package canary

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/check"
	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/lifecycle"
)

// engine is a stand-in engine: its canary answers status (or hangs), each
// canary produces canaryTokens, and its metrics say inFlight and tokens.
type engine struct {
	mu                             sync.Mutex
	status                         int
	hang                           bool
	inFlight, tokens, canaryTokens float64
	canaries                       []string
}

func (e *engine) serve(w http.ResponseWriter, r *http.Request) {
	e.mu.Lock()
	defer e.mu.Unlock()
	switch r.URL.Path {
	case "/metrics":
		fmt.Fprintf(w, "vllm:num_requests_running %g\nvllm:generation_tokens_total %g\n", e.inFlight, e.tokens)
	case "/v1/completions":
		b, _ := io.ReadAll(r.Body)
		e.canaries = append(e.canaries, r.Method+" "+string(b))
		if e.hang {
			e.mu.Unlock()
			<-r.Context().Done()
			e.mu.Lock()
			return
		}
		e.tokens += e.canaryTokens
		w.WriteHeader(e.status)
	default:
		http.NotFound(w, r)
	}
}

func (e *engine) sent() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.canaries)
}

func (e *engine) set(f func(*engine)) {
	e.mu.Lock()
	defer e.mu.Unlock()
	f(e)
}

type fixture struct {
	t      *testing.T
	e      *engine
	c      *canary
	now    time.Time
	tgt    check.Target
	owned  int
	refuse error
}

func newFixture(t *testing.T, progress bool) *fixture {
	f := &fixture{t: t, e: &engine{status: http.StatusOK, canaryTokens: 1}, now: time.Unix(1000, 0)}
	srv := httptest.NewServer(http.HandlerFunc(f.e.serve))
	t.Cleanup(srv.Close)
	h := config.Health{Timeout: time.Second, CanaryIdle: 30 * time.Second, CanaryTimeout: 200 * time.Millisecond,
		Canary: &config.WarmupRequest{Method: "POST", Path: "/v1/completions", Body: `{"max_tokens":1}`}}
	if progress {
		h.ProgressURL, h.Stall = srv.URL+"/metrics", time.Minute
	}
	c := New(check.Config{HealthURL: srv.URL + "/health", Health: h})
	require.NotNil(t, c)
	f.c = c.(*canary)
	f.c.now = func() time.Time { return f.now }
	f.tgt = check.Target{Run: 7, Owned: func(_, _ netip.AddrPort) error { f.owned++; return f.refuse }}
	return f
}

// look advances the clock by d and looks once; it returns the canary's
// Probed, if one was sent.
func (f *fixture) look(d time.Duration) (lifecycle.Probed, bool) {
	f.t.Helper()
	f.now = f.now.Add(d)
	res := f.c.Check(context.Background(), f.tgt)
	if len(res.Events) == 0 {
		require.NoError(f.t, res.Err)
		return lifecycle.Probed{}, false
	}
	require.Len(f.t, res.Events, 1)
	p := res.Events[0].(lifecycle.Probed)
	assert.True(f.t, p.Canary)
	assert.Equal(f.t, lifecycle.RunID(7), p.Run)
	assert.Equal(f.t, res.Err, p.Err)
	return p, true
}

func TestCanaryOnlyWithItsRequest(t *testing.T) {
	assert.Nil(t, New(check.Config{}))
	c := New(check.Config{Health: config.Health{Canary: &config.WarmupRequest{Method: "GET", Path: "/x"}, CanaryIdle: time.Second}})
	require.NotNil(t, c)
	assert.Equal(t, check.Schedule{After: "health"}, c.Schedule())
	assert.Equal(t, config.DefaultCanaryTimeout, c.(*canary).timeout, "the default timeout")
}

// Without metrics, idle is the time since the last canary (or the start).
func TestCanaryWithoutMetricsGoesEveryIdleTime(t *testing.T) {
	f := newFixture(t, false)
	_, sent := f.look(0)
	assert.False(t, sent, "just up")
	_, sent = f.look(29 * time.Second)
	assert.False(t, sent)
	p, sent := f.look(time.Second)
	require.True(t, sent, "idle 30 s")
	assert.NoError(t, p.Err)
	assert.Equal(t, []string{`POST {"max_tokens":1}`}, f.e.canaries)
	assert.Equal(t, 1, f.owned, "the engine's own scope answered")
	_, sent = f.look(5 * time.Second)
	assert.False(t, sent, "idle again from the canary")
	_, sent = f.look(25 * time.Second)
	assert.True(t, sent)
}

// With metrics, a request in flight or a moved token count is use and
// restarts the idle clock; the canary's own tokens are not.
func TestCanaryWithMetricsWaitsForIdle(t *testing.T) {
	f := newFixture(t, true)
	f.e.canaryTokens = 5
	f.look(0)
	f.e.set(func(e *engine) { e.inFlight = 1 })
	_, sent := f.look(40 * time.Second)
	assert.False(t, sent, "a request in flight")
	f.e.set(func(e *engine) { e.inFlight, e.tokens = 0, 100 })
	_, sent = f.look(20 * time.Second)
	assert.False(t, sent, "the tokens moved: in use")
	_, sent = f.look(20 * time.Second)
	assert.False(t, sent, "idle for 20 s only")
	_, sent = f.look(30 * time.Second)
	require.True(t, sent, "idle 30 s, tokens unchanged")
	assert.Equal(t, 1, f.e.sent())
	// The canary made 5 tokens; they do not make the engine look used.
	_, sent = f.look(15 * time.Second)
	assert.False(t, sent)
	_, sent = f.look(15 * time.Second)
	assert.True(t, sent, "30 s after the last canary, its tokens not counted as use")
	// A user's tokens are.
	f.e.set(func(e *engine) { e.tokens += 3 })
	_, sent = f.look(30 * time.Second)
	assert.False(t, sent, "used since the last look")
	_, sent = f.look(30 * time.Second)
	assert.True(t, sent)
}

// A metrics endpoint that cannot be read leaves the time since the last
// canary.
func TestCanaryWithUnreadableMetrics(t *testing.T) {
	f := newFixture(t, true)
	f.c.progressURL = f.c.url[:len(f.c.url)-len("/health")] + "/nometrics"
	f.look(0)
	_, sent := f.look(30 * time.Second)
	assert.True(t, sent)
}

// A failed or timed-out canary is told as a failed Probed{Canary}, and the
// canary is sent again at the next look until it succeeds.
func TestCanaryFailureAndTimeout(t *testing.T) {
	f := newFixture(t, false)
	f.look(0)
	f.e.set(func(e *engine) { e.status = http.StatusInternalServerError })
	p, sent := f.look(30 * time.Second)
	require.True(t, sent)
	assert.ErrorContains(t, p.Err, "POST /v1/completions answered 500")
	p, sent = f.look(time.Second)
	require.True(t, sent, "a failed canary is sent again at once")
	require.Error(t, p.Err)

	f.e.set(func(e *engine) { e.status, e.hang = http.StatusOK, true })
	start := time.Now()
	p, sent = f.look(time.Second)
	require.True(t, sent)
	require.Error(t, p.Err, "no answer within CanaryTimeoutSec")
	assert.Less(t, time.Since(start), 5*time.Second)

	f.e.set(func(e *engine) { e.hang = false })
	p, sent = f.look(time.Second)
	require.True(t, sent)
	assert.NoError(t, p.Err)
	_, sent = f.look(time.Second)
	assert.False(t, sent, "good again: idle time from now")
}

// A socket outside the engine's scope gets no canary.
func TestCanaryOnlyToTheEnginesScope(t *testing.T) {
	f := newFixture(t, false)
	f.refuse = errors.New("outside the scope")
	f.look(0)
	p, sent := f.look(30 * time.Second)
	require.True(t, sent)
	assert.ErrorIs(t, p.Err, f.refuse)
	assert.Zero(t, f.e.sent())
}

// The canary goes only through the target's Serving gate: shut (the pool
// asleep, waking or stopping) nothing is sent, however long it has been
// idle, and its idle time starts over once the gate opens.
func TestCanaryOnlyWhileTheGateIsOpen(t *testing.T) {
	f := newFixture(t, false)
	f.tgt.Serving = &check.Gate{}
	f.look(0)
	_, sent := f.look(time.Hour)
	assert.False(t, sent, "shut: not sent")
	assert.Zero(t, f.e.sent())
	f.tgt.Serving.Open()
	_, sent = f.look(time.Second)
	assert.False(t, sent, "idle from when the gate was last seen shut")
	_, sent = f.look(30 * time.Second)
	assert.True(t, sent, "open and idle: sent")
	f.tgt.Serving.Shut()
	_, sent = f.look(time.Hour)
	assert.False(t, sent)
	assert.Equal(t, 1, f.e.sent())
}
