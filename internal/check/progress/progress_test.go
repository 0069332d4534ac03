package progress

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/check"
	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/lifecycle"
)

func TestProgressOnlyWithStall(t *testing.T) {
	assert.Nil(t, New(check.Config{}))
	c := New(check.Config{Health: config.Health{ProgressURL: "http://127.0.0.1:1/metrics", Stall: time.Second, Timeout: time.Second}})
	require.NotNil(t, c)
	assert.Equal(t, check.Schedule{After: "health"}, c.Schedule())
}

// Each look is told as Progress: the reading, or the error with NoAnswer
// for an endpoint that did not answer in time; the answering socket is
// always verified.
func TestProgressTellsTheReading(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/hang" {
			<-r.Context().Done()
			return
		}
		w.Write([]byte("llamacpp:requests_processing 2\nllamacpp:n_decode_total 40\n"))
	}))
	defer srv.Close()
	verified := 0
	tgt := check.Target{Run: 5, Owned: func(_, _ netip.AddrPort) error { verified++; return nil }}
	mk := func(path string) check.Check {
		return New(check.Config{Health: config.Health{ProgressURL: srv.URL + path, Stall: time.Second, Timeout: 100 * time.Millisecond}})
	}

	res := mk("/metrics").Check(context.Background(), tgt)
	require.NoError(t, res.Err)
	assert.Equal(t, []lifecycle.Event{lifecycle.Progress{Run: 5, InFlight: 2, Tokens: 40}}, res.Events)
	assert.Equal(t, 1, verified)

	res = mk("/hang").Check(context.Background(), tgt)
	require.Error(t, res.Err)
	require.Len(t, res.Events, 1)
	p := res.Events[0].(lifecycle.Progress)
	assert.True(t, p.NoAnswer)
	assert.Equal(t, res.Err, p.Err)
	assert.Equal(t, 2, verified)

	refused := errors.New("outside the scope")
	res = mk("/metrics").Check(context.Background(), check.Target{Run: 5, Owned: func(_, _ netip.AddrPort) error { return refused }})
	assert.ErrorIs(t, res.Err, refused)
	assert.False(t, res.Events[0].(lifecycle.Progress).NoAnswer)
}
