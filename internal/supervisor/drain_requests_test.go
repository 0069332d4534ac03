package supervisor_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// A request that holds no lease (a router that takes none) is still the
// engine's work: where the pool reads the engine's metrics, its drain
// waits for the engine's own requests in flight before SIGTERM, and the
// request completes whole.
func TestADrainLetsARequestWithoutALeaseComplete(t *testing.T) {
	e := testpool.New(t, nil)
	s := e.Start(testpool.Spec{ID: "inflight", Devices: "0", SimArgs: "--token-time 20ms",
		Extra: "[Health]\nProgressURL=http://127.0.0.1:%p/metrics\nStallSec=5\n"})
	waitFor(t, s, "ready", ready(1))
	type answer struct {
		code   int
		tokens int
		err    error
	}
	done := make(chan answer, 1)
	go func() {
		resp, err := http.Post(fmt.Sprintf("http://127.0.0.1:%d/completion", s.Port), "application/json",
			bytes.NewBufferString(`{"prompt":"hello","n_predict":100}`))
		if err != nil {
			done <- answer{err: err}
			return
		}
		defer resp.Body.Close()
		var body struct {
			TokensPredicted int `json:"tokens_predicted"`
		}
		b, _ := io.ReadAll(resp.Body)
		err = json.Unmarshal(b, &body)
		done <- answer{code: resp.StatusCode, tokens: body.TokensPredicted, err: err}
	}()
	require.Eventually(t, func() bool {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", s.Port))
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return strings.Contains(string(b), "llamacpp:requests_processing 1")
	}, 10*time.Second, 10*time.Millisecond, "the request is in flight")
	start := time.Now()
	res, err := s.Drain(e.Ctx, 30*time.Second)
	require.NoError(t, err)
	assert.Equal(t, lifecycle.Drained, res.Outcome)
	a := <-done
	require.NoError(t, a.err)
	assert.Equal(t, http.StatusOK, a.code)
	assert.Equal(t, 100, a.tokens, "the request was not cut")
	assert.Greater(t, time.Since(start), 500*time.Millisecond, "the drain waited for it")
	assert.Equal(t, lifecycle.Stopped, s.Snapshot().State)
}
