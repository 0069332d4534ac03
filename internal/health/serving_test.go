package health

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestProgressReadsTheEnginesOwnMetrics(t *testing.T) {
	for _, tc := range []struct {
		name             string
		status           int
		body             string
		inFlight, tokens float64
		err              string
	}{
		{name: "llama.cpp", status: 200, body: "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 2\n# TYPE llamacpp:tokens_predicted_total counter\nllamacpp:tokens_predicted_total 1234\n",
			inFlight: 2, tokens: 1234},
		{name: "vLLM, summed over its series", status: 200, body: "vllm:num_requests_running{model_name=\"a\"} 1\nvllm:num_requests_running{model_name=\"b\"} 2\nvllm:generation_tokens_total{model_name=\"a\"} 10\nvllm:generation_tokens_total{model_name=\"b\"} 5\n",
			inFlight: 3, tokens: 15},
		{name: "llama.cpp's per-step counter first", status: 200, body: "llamacpp:requests_processing 1\nllamacpp:tokens_predicted_total 100\nllamacpp:n_decode_total 160\n",
			inFlight: 1, tokens: 160},
		{name: "neither engine's names", status: 200, body: "up 1\n", err: "has no llamacpp:requests_processing or vllm:num_requests_running"},
		{name: "not Prometheus text", status: 200, body: "<html>hello</html>", err: "not Prometheus text"},
		{name: "not found", status: 404, body: "", err: "answered 404"},
		{name: "too large", status: 200, body: "# " + strings.Repeat("x", maxMetrics+10) + "\n", err: "answer over"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.WriteHeader(tc.status)
				w.Write([]byte(tc.body))
			}))
			defer srv.Close()
			in, tok, err := Progress(context.Background(), srv.URL+"/metrics", 5*time.Second, nil)
			if tc.err != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tc.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.inFlight, in)
			assert.Equal(t, tc.tokens, tok)
		})
	}
}

func TestProgressThatHangsIsNoAnswer(t *testing.T) {
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { <-release }))
	defer srv.Close()
	defer close(release)
	_, _, err := Progress(context.Background(), srv.URL+"/metrics", 50*time.Millisecond, nil)
	assert.ErrorIs(t, err, ErrNoAnswer)
}

func TestWarmupRequest(t *testing.T) {
	var got []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		got = append(got, r.Method+" "+r.URL.Path+" "+r.Header.Get("Content-Type")+" "+string(b))
		switch r.URL.Path {
		case "/completion":
			w.Write([]byte(`{"content":"x"}`))
		case "/slow":
			time.Sleep(300 * time.Millisecond)
		default:
			http.Error(w, `{"error":"nope"}`, 500)
		}
	}))
	defer srv.Close()
	base := srv.URL + "/health"
	require.NoError(t, Request(context.Background(), base, "POST", "/completion", `{"prompt":"Hi","n_predict":1}`, 5*time.Second, nil))
	assert.Equal(t, []string{`POST /completion application/json {"prompt":"Hi","n_predict":1}`}, got)
	err := Request(context.Background(), base, "POST", "/fail", "", 5*time.Second, nil)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "POST /fail answered 500")
	err = Request(context.Background(), base, "GET", "/slow", "", 50*time.Millisecond, nil)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "no answer within 50ms")
}

// The metrics read and the warm-up request verify their peer like the
// probe: a refused peer gets nothing, an accepted one the request.
func TestProgressAndRequestSendNothingToAnUnverifiedPeer(t *testing.T) {
	got := 0
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got++
		w.Write([]byte("llamacpp:requests_processing 1\nllamacpp:n_decode_total 5\n"))
	}))
	defer srv.Close()
	var seen []netip.AddrPort
	refuse := func(_, peer netip.AddrPort) error {
		seen = append(seen, peer)
		return errors.New("held by a socket outside the scope")
	}
	accept := func(_, _ netip.AddrPort) error { return nil }

	_, _, err := Progress(context.Background(), srv.URL+"/metrics", 5*time.Second, refuse)
	assert.ErrorContains(t, err, "outside the scope")
	err = Request(context.Background(), srv.URL+"/health", "POST", "/completion", `{}`, 5*time.Second, refuse)
	assert.ErrorContains(t, err, "outside the scope")
	assert.Zero(t, got, "nothing reached the refused peer")
	require.Len(t, seen, 2)
	assert.Equal(t, srv.Listener.Addr().String(), seen[0].String())

	in, tok, err := Progress(context.Background(), srv.URL+"/metrics", 5*time.Second, accept)
	require.NoError(t, err)
	assert.Equal(t, []float64{1, 5}, []float64{in, tok})
	require.NoError(t, Request(context.Background(), srv.URL+"/health", "POST", "/completion", `{}`, 5*time.Second, accept))
	assert.Equal(t, 2, got)
}
