package main

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// llama-server's metric names (tools/server, --metrics). The colon is part
// of llama.cpp's names; Prometheus allows it in metric names.
const (
	metricRequestsProcessing = "llamacpp:requests_processing"
	metricTokensPredicted    = "llamacpp:tokens_predicted_total"
	metricDecodes            = "llamacpp:n_decode_total"
)

const (
	// defaultNPredict is what a /completion without n_predict generates;
	// maxNPredict stands in for the context size that bounds llama.cpp's
	// n_predict -1 ("until the context is full").
	defaultNPredict = 16
	maxNPredict     = 4096
	// busyTokenTime is how slowly a busy engine still makes progress.
	busyTokenTime = 200 * time.Millisecond
)

var (
	errStalled  = errors.New("engine stalled")
	errShutdown = errors.New("shutting down")
)

// engine stands for llama-server's slots: requests in flight, the tokens
// they produce and the counters /metrics shows. A stalled engine produces
// no token again; a busy one keeps a request in flight and produces slowly.
type engine struct {
	reg        *prometheus.Registry
	processing prometheus.Gauge
	predicted  prometheus.Counter
	decodes    prometheus.Counter
	tokenTime  time.Duration
	shutdown   <-chan struct{}
	tasks      atomic.Int64

	mu      sync.Mutex
	stalled bool
	busy    bool
}

func newEngine(tokenTime time.Duration, shutdown <-chan struct{}) *engine {
	e := &engine{
		reg: prometheus.NewRegistry(),
		processing: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: metricRequestsProcessing, Help: "Number of requests processing.",
		}),
		predicted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: metricTokensPredicted, Help: "Number of generation tokens processed.",
		}),
		decodes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: metricDecodes, Help: "Total number of llama_decode() calls",
		}),
		tokenTime: tokenTime,
		shutdown:  shutdown,
	}
	e.reg.MustRegister(e.processing, e.predicted, e.decodes)
	return e
}

// token produces one token unless the engine is stalled. Under the lock,
// so that once stall() returns no counter moves again.
func (e *engine) token() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.stalled {
		return false
	}
	e.predicted.Inc()
	e.decodes.Inc()
	return true
}

func (e *engine) step() time.Duration {
	e.mu.Lock()
	defer e.mu.Unlock()
	return tokenPace(e.tokenTime, e.busy)
}

// tokenPace is the time a token takes: a busy engine is no faster than
// busyTokenTime.
func tokenPace(tokenTime time.Duration, busy bool) time.Duration {
	if busy {
		return max(tokenTime, busyTokenTime)
	}
	return tokenTime
}

// paced calls token n times, each a step() after the last, and says how
// many it made. It stops early, with the reason, when ctx ends, shutdown
// closes or token fails; a nil shutdown never closes.
func paced(ctx context.Context, shutdown <-chan struct{}, n int, step func() time.Duration, token func(made int) error) (int, error) {
	timer := time.NewTimer(step())
	defer timer.Stop()
	for i := range n {
		if i > 0 {
			timer.Reset(step())
		}
		select {
		case <-ctx.Done():
			return i, ctx.Err()
		case <-shutdown:
			return i, errShutdown
		case <-timer.C:
		}
		if err := token(i); err != nil {
			return i, err
		}
	}
	return n, nil
}

// generate produces n tokens at the engine's pace, holding a request in
// flight meanwhile. A stalled engine holds it until the client gives up or
// the process ends.
func (e *engine) generate(ctx context.Context, n int) (int, error) {
	e.processing.Inc()
	defer e.processing.Dec()
	return paced(ctx, e.shutdown, n, e.step, func(int) error {
		if e.token() {
			return nil
		}
		select {
		case <-ctx.Done():
		case <-e.shutdown:
		}
		return errStalled
	})
}

// stall freezes the engine with a request in flight that never ends, as
// an engine whose decode loop is stuck while its HTTP server lives.
func (e *engine) stall() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.stalled {
		return
	}
	e.stalled = true
	e.processing.Inc()
}

// setBusy keeps a request in flight from now on that produces a token
// every busyTokenTime, and slows every other request to that pace.
func (e *engine) setBusy() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.busy {
		return
	}
	e.busy = true
	e.processing.Inc()
	go func() {
		t := time.NewTicker(busyTokenTime)
		defer t.Stop()
		for {
			select {
			case <-e.shutdown:
				return
			case <-t.C:
				e.token()
			}
		}
	}()
}
