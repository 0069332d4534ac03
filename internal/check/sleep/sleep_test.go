package sleep

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/check"
	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/lifecycle"
)

// Sleep and Wake exist only with Sleep=vllm and a port; they POST
// /sleep?level=N and /wake_up to the engine's port on loopback, from its
// own socket only, and tell Slept and Woke.
func TestSleepAndWakeAskTheEngine(t *testing.T) {
	assert.Nil(t, Sleep.New(check.Config{Port: 8000}))
	assert.Nil(t, Wake.New(check.Config{Port: 8000, Sleep: config.SleepNone}))
	assert.Nil(t, Wake.New(check.Config{Sleep: config.SleepVLLM}), "no port: nothing to ask")

	var got []string
	fail := false
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got = append(got, r.Method+" "+r.URL.RequestURI())
		if fail {
			http.Error(w, "cannot", http.StatusInternalServerError)
		}
	}))
	defer srv.Close()
	port, err := strconv.Atoi(srv.URL[len("http://127.0.0.1:"):])
	require.NoError(t, err)
	cfg := check.Config{Port: port, Sleep: config.SleepVLLM, SleepLevel: 2, Health: config.Health{StartTimeout: 5 * time.Second}}
	verified := 0
	tgt := check.Target{Run: 4, Owned: func(_, peer netip.AddrPort) error {
		verified++
		assert.Equal(t, uint16(port), peer.Port())
		return nil
	}}
	s, w := Sleep.New(cfg), Wake.New(cfg)
	assert.Equal(t, check.Schedule{OnDemand: true}, s.Schedule())
	res := s.Check(context.Background(), tgt)
	require.NoError(t, res.Err)
	assert.Equal(t, []lifecycle.Event{lifecycle.Slept{Run: 4}}, res.Events)
	res = w.Check(context.Background(), tgt)
	require.NoError(t, res.Err)
	assert.Equal(t, []lifecycle.Event{lifecycle.Woke{Run: 4}}, res.Events)
	assert.Equal(t, []string{"POST /sleep?level=2", "POST /wake_up"}, got)
	assert.Equal(t, 2, verified)

	fail = true
	res = w.Check(context.Background(), tgt)
	assert.ErrorContains(t, res.Err, "POST /wake_up answered 500")
	assert.Equal(t, []lifecycle.Event{lifecycle.Woke{Run: 4, Err: res.Err}}, res.Events)

	refused := errors.New("outside the scope")
	res = s.Check(context.Background(), check.Target{Run: 4, Owned: func(_, _ netip.AddrPort) error { return refused }})
	assert.ErrorIs(t, res.Err, refused)
	assert.Equal(t, []lifecycle.Event{lifecycle.Slept{Run: 4, Err: res.Err}}, res.Events)
	assert.Len(t, got, 3, "the refused peer got nothing")
}

// A wake that hangs is a failed wake once its timeout passes.
func TestWakeIsBounded(t *testing.T) {
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer srv.Close()
	defer close(release)
	port, err := strconv.Atoi(srv.URL[len("http://127.0.0.1:"):])
	require.NoError(t, err)
	w := Wake.New(check.Config{Port: port, Sleep: config.SleepVLLM, Health: config.Health{StartTimeout: 200 * time.Millisecond}})
	start := time.Now()
	res := w.Check(context.Background(), check.Target{Run: 1, Owned: func(_, _ netip.AddrPort) error { return nil }})
	assert.ErrorContains(t, res.Err, "no answer within 200ms")
	assert.Less(t, time.Since(start), 5*time.Second)
}

// Asking the engine to sleep shuts the run's Serving gate first, and waits
// for a canary let through before: none is in flight when /sleep
// arrives, and none is sent after.
func TestSleepShutsTheServingGateFirst(t *testing.T) {
	canaryIn, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	free := func() { once.Do(func() { close(release) }) }
	var mu sync.Mutex
	var got []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		got = append(got, r.URL.Path)
		mu.Unlock()
		if r.URL.Path == "/v1/completions" {
			close(canaryIn)
			select {
			case <-release:
			case <-r.Context().Done():
			}
		}
	}))
	// The canary is let go before the server closes, whatever happened.
	defer srv.Close()
	defer free()
	port, err := strconv.Atoi(srv.URL[len("http://127.0.0.1:"):])
	require.NoError(t, err)
	gate := &check.Gate{}
	gate.Open()
	tgt := check.Target{Run: 4, Serving: gate}
	canaryDone := make(chan bool)
	go func() {
		canaryDone <- gate.Through(func() {
			c := http.Client{Timeout: 5 * time.Second}
			if resp, err := c.Post(srv.URL+"/v1/completions", "", nil); err == nil {
				resp.Body.Close()
			}
		})
	}()
	<-canaryIn
	slept := make(chan check.Result)
	go func() {
		slept <- Sleep.New(check.Config{Port: port, Sleep: config.SleepVLLM, Health: config.Health{StartTimeout: 5 * time.Second}}).Check(context.Background(), tgt)
	}()
	select {
	case <-slept:
		t.Fatal("the sleep was asked with a canary in flight")
	case <-time.After(100 * time.Millisecond):
	}
	free()
	require.True(t, <-canaryDone)
	select {
	case res := <-slept:
		require.NoError(t, res.Err)
	case <-time.After(5 * time.Second):
		t.Fatal("the sleep was not asked once the canary returned")
	}
	mu.Lock()
	assert.Equal(t, []string{"/v1/completions", "/sleep"}, got)
	mu.Unlock()
	assert.False(t, gate.Through(func() {}), "shut: no canary after")
}
