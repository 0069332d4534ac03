package health

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestProbe(t *testing.T) {
	status := http.StatusServiceUnavailable
	hang := make(chan struct{})
	defer close(hang)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/hang" {
			select {
			case <-hang:
			case <-r.Context().Done():
			}
			return
		}
		w.WriteHeader(status)
		w.Write([]byte(`{"status":"loading model"}`))
	}))
	defer srv.Close()
	ctx := context.Background()
	err := New(srv.URL+"/health", time.Second).Probe(ctx, nil)
	assert.ErrorContains(t, err, "answered 503")
	status = http.StatusOK
	assert.NoError(t, New(srv.URL+"/health", time.Second).Probe(ctx, nil))
	err = New(srv.URL+"/hang", 50*time.Millisecond).Probe(ctx, nil)
	assert.ErrorContains(t, err, "no answer")
	assert.Error(t, New("http://127.0.0.1:1/health", time.Second).Probe(ctx, nil))
}

// Every probe is its own connection, closed once answered; a cancelled
// probe ends at once, not at its timeout.
func TestProbeConnectionsAndCancel(t *testing.T) {
	var mu sync.Mutex
	open := 0
	hang := make(chan struct{})
	defer close(hang)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		assert.Equal(t, "GET", r.Method)
		assert.Equal(t, "pool-managerd", r.UserAgent())
		if r.URL.Path == "/hang" {
			select {
			case <-hang:
			case <-r.Context().Done():
			}
			return
		}
		w.Write([]byte(`{"status":"ok"}`))
	}))
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		mu.Lock()
		defer mu.Unlock()
		switch s {
		case http.StateNew:
			open++
		case http.StateClosed, http.StateHijacked:
			open--
		}
	}
	srv.Start()
	defer srv.Close()
	p := New(srv.URL+"/health?verbose=1", time.Second)
	for range 5 {
		require.NoError(t, p.Probe(context.Background(), nil))
	}
	assert.Eventually(t, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return open == 0
	}, 5*time.Second, 10*time.Millisecond, "no probe connection is kept")

	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	start := time.Now()
	assert.Error(t, New(srv.URL+"/hang", 30*time.Second).Probe(ctx, nil))
	assert.Less(t, time.Since(start), 10*time.Second, "the cancel ended the probe")
}

// A server that closes without answering, or answers garbage, is
// unhealthy with an error naming the URL.
func TestProbeBadAnswers(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	go func() {
		for i := 0; ; i++ {
			c, err := l.Accept()
			if err != nil {
				return
			}
			if i%2 == 1 {
				c.Write([]byte("SSH-2.0-OpenSSH\r\n"))
			}
			c.Close()
		}
	}()
	url := "http://" + l.Addr().String() + "/health"
	for range 2 {
		err := New(url, time.Second).Probe(context.Background(), nil)
		require.Error(t, err)
		assert.Contains(t, err.Error(), url)
	}
}

// A probe whose peer fails verification sends the peer nothing and fails,
// over plain HTTP and through the https client alike.
func TestProbeSendsNothingToAnUnverifiedPeer(t *testing.T) {
	for _, tls := range []bool{false, true} {
		var mu sync.Mutex
		got := 0
		h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			got++
			mu.Unlock()
		})
		srv := httptest.NewUnstartedServer(h)
		if tls {
			srv.StartTLS()
		} else {
			srv.Start()
		}
		p := New(srv.URL+"/health", time.Second)
		if tls {
			p.client.Transport.(*http.Transport).TLSClientConfig = srv.Client().Transport.(*http.Transport).TLSClientConfig
		}
		var seen netip.AddrPort
		refuse := func(_, peer netip.AddrPort) error {
			seen = peer
			return errors.New("held by a socket outside the scope")
		}
		err := p.Probe(context.Background(), refuse)
		assert.ErrorContains(t, err, "outside the scope", "tls=%v", tls)
		assert.Equal(t, srv.Listener.Addr().String(), seen.String())
		accept := func(_, _ netip.AddrPort) error { return nil }
		require.NoError(t, p.Probe(context.Background(), accept))
		srv.Close()
		mu.Lock()
		assert.Equal(t, 1, got, "only the verified probe reached the server (tls=%v)", tls)
		mu.Unlock()
	}
}
