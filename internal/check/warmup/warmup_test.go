package warmup

import (
	"context"
	"errors"
	"io"
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

// The warm-up is on demand, only where WarmupRequest= is set; its answer
// is told as WarmedUp, from the engine's own socket only.
func TestWarmupTellsWarmedUp(t *testing.T) {
	assert.Nil(t, New(check.Config{}))
	var got []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		got = append(got, r.Method+" "+r.URL.Path+" "+string(b))
		if r.URL.Path != "/completion" {
			http.Error(w, "no", http.StatusNotFound)
		}
	}))
	defer srv.Close()
	mk := func(path string) check.Check {
		return New(check.Config{HealthURL: srv.URL + "/health", Health: config.Health{
			Warmup: &config.WarmupRequest{Method: "POST", Path: path, Body: `{"n_predict":1}`}, WarmupTimeout: 5 * time.Second}})
	}
	verified := 0
	tgt := check.Target{Run: 6, Owned: func(_, _ netip.AddrPort) error { verified++; return nil }}
	c := mk("/completion")
	assert.Equal(t, check.Schedule{OnDemand: true}, c.Schedule())
	res := c.Check(context.Background(), tgt)
	require.NoError(t, res.Err)
	assert.Equal(t, []lifecycle.Event{lifecycle.WarmedUp{Run: 6}}, res.Events)
	assert.Equal(t, []string{`POST /completion {"n_predict":1}`}, got)
	assert.Equal(t, 1, verified)

	res = mk("/nope").Check(context.Background(), tgt)
	assert.ErrorContains(t, res.Err, "POST /nope answered 404")
	assert.Equal(t, []lifecycle.Event{lifecycle.WarmedUp{Run: 6, Err: res.Err}}, res.Events)

	refused := errors.New("outside the scope")
	res = c.Check(context.Background(), check.Target{Run: 6, Owned: func(_, _ netip.AddrPort) error { return refused }})
	assert.ErrorIs(t, res.Err, refused)
	assert.Len(t, got, 2, "the refused peer got nothing")
}
