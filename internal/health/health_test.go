package health

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
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
	err := New(srv.URL+"/health", time.Second).Probe(ctx)
	assert.ErrorContains(t, err, "answered 503")
	status = http.StatusOK
	assert.NoError(t, New(srv.URL+"/health", time.Second).Probe(ctx))
	err = New(srv.URL+"/hang", 50*time.Millisecond).Probe(ctx)
	assert.ErrorContains(t, err, "no answer")
	assert.Error(t, New("http://127.0.0.1:1/health", time.Second).Probe(ctx))
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
		require.NoError(t, p.Probe(context.Background()))
	}
	assert.Eventually(t, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return open == 0
	}, 5*time.Second, 10*time.Millisecond, "no probe connection is kept")

	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	start := time.Now()
	assert.Error(t, New(srv.URL+"/hang", 30*time.Second).Probe(ctx))
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
		err := New(url, time.Second).Probe(context.Background())
		require.Error(t, err)
		assert.Contains(t, err.Error(), url)
	}
}
