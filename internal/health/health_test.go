package health

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
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
