package probe

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/check"
	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/sockdiag"
)

func cfg(url string) check.Config {
	return check.Config{HealthURL: url, Health: config.Health{Interval: 5 * time.Second, Timeout: time.Second, StartTimeout: time.Minute}}
}

// The first good look is Healthy, later ones Probed; the engine's scope
// is asked who answered on every look, Ready or not.
func TestProbeTellsHealthyThenProbedAndVerifiesEveryLook(t *testing.T) {
	var status atomic.Int32
	status.Store(http.StatusServiceUnavailable)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(int(status.Load()))
	}))
	defer srv.Close()
	c := New(cfg(srv.URL + "/health"))
	assert.Equal(t, check.Schedule{Every: 5 * time.Second, StartTimeout: time.Minute}, c.Schedule())
	verified := 0
	var refuse error
	tgt := check.Target{Run: 4, Owned: func(local, peer netip.AddrPort) error {
		verified++
		assert.Equal(t, srv.Listener.Addr().String(), peer.String(), "the peer is the engine's end")
		assert.True(t, local.Addr().IsLoopback() && local.Port() != 0, "the local end is the probe's: %s", local)
		return refuse
	}}
	look := func() check.Result { return c.Check(context.Background(), tgt) }

	res := look()
	assert.ErrorContains(t, res.Err, "answered 503")
	assert.Empty(t, res.Events, "a failed start look tells nothing")
	status.Store(http.StatusOK)
	res = look()
	require.NoError(t, res.Err)
	assert.Equal(t, []lifecycle.Event{lifecycle.Healthy{Run: 4}}, res.Events)
	assert.Equal(t, 2, verified, "verified while starting")

	res = look()
	assert.Empty(t, res.Events, "a good look after a good look changes nothing: not told")
	assert.True(t, res.Beat, "its time is kept")
	assert.Equal(t, 3, verified, "a healthy engine's look is verified too")
	refuse = &sockdiag.ForeignError{Port: 1, Scope: sockdiag.Scope{Unit: "pool-engine-x.scope"}}
	res = look()
	require.Len(t, res.Events, 2)
	assert.IsType(t, lifecycle.Squatted{}, res.Events[0])
	assert.ErrorIs(t, res.Events[1].(lifecycle.Probed).Err, refuse, "a foreign peer after Ready fails the look")
	assert.Equal(t, 4, verified)
}

// A port held outside the engine's scope fails the look, sends nothing,
// and is told as Squatted once per run.
func TestProbeTellsASquatterOnce(t *testing.T) {
	got := 0
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { got++ }))
	defer srv.Close()
	foreign := &sockdiag.ForeignError{Port: 1, Scope: sockdiag.Scope{Unit: "pool-engine-x.scope"}}
	tgt := check.Target{Run: 9, Owned: func(_, _ netip.AddrPort) error { return foreign }}
	c := New(cfg(srv.URL + "/health"))
	res := c.Check(context.Background(), tgt)
	assert.ErrorIs(t, res.Err, foreign)
	assert.Equal(t, []lifecycle.Event{lifecycle.Squatted{Run: 9, Msg: foreign.Error()}}, res.Events)
	res = c.Check(context.Background(), tgt)
	assert.ErrorIs(t, res.Err, foreign)
	assert.Empty(t, res.Events, "told once")
	assert.Zero(t, got, "the squatter got no request")
	// Another run is told again.
	assert.Len(t, New(cfg(srv.URL+"/health")).Check(context.Background(), tgt).Events, 1)
}
