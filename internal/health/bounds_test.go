package health

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// allocated is what f allocates, in bytes, across the whole process.
func allocated(f func()) uint64 {
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	f()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// streaming is an engine that answers every connection with head, then
// repeats fill until size bytes are sent or the daemon hangs up. It
// allocates nothing per write, so what is allocated is the daemon's.
func streaming(t *testing.T, head, fill string, size int) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	chunk := bytes.Repeat([]byte(fill), max(1, (64<<10)/len(fill)))
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				// The request first: an answer before it is none.
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadSlice('\n')
					if err != nil {
						return
					}
					if len(bytes.TrimSpace(line)) == 0 {
						break
					}
				}
				go io.Copy(io.Discard, r)
				if _, err := io.WriteString(c, head); err != nil {
					return
				}
				for sent := 0; sent < size; sent += len(chunk) {
					if _, err := c.Write(chunk[:min(len(chunk), size-sent)]); err != nil {
						return
					}
				}
			}()
		}
	}()
	return "http://" + l.Addr().String()
}

const answer256MiB = 256 << 20

func TestAHealthAnswerOf256MiBCostsTheDaemonAtMost256KiB(t *testing.T) {
	for _, tc := range []struct{ name, head, err string }{
		{"status line", "HTTP/1.1 200 ", "status line and headers over"},
		{"header", "HTTP/1.1 200 OK\r\nX-Filler: ", "status line and headers over"},
		{"many headers", "HTTP/1.1 200 OK\r\n", "status line and headers over"},
		{"body", "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 268435456\r\n\r\n", "answered 503"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fill := "x"
			if tc.name == "many headers" {
				fill = "X-Filler: x\r\n"
			}
			url := streaming(t, tc.head, fill, answer256MiB)
			var err error
			n := allocated(func() { err = New(url+"/health", 30*time.Second).Probe(context.Background(), nil) })
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.err)
			t.Logf("allocated %d KiB", n>>10)
			assert.LessOrEqual(t, n, uint64(256<<10), "allocated %d KiB", n>>10)
		})
	}
}

// Progress and Request go through net/http's client: its head is bounded
// the same.
func TestAMetricsHeadOf256MiBCostsTheDaemonAtMost256KiB(t *testing.T) {
	url := streaming(t, "HTTP/1.1 200 ", "x", answer256MiB)
	var perr, rerr error
	n := allocated(func() { _, _, perr = Progress(context.Background(), url+"/metrics", 30*time.Second, nil) })
	assert.ErrorContains(t, perr, "exceeded")
	assert.LessOrEqual(t, n, uint64(256<<10), "Progress allocated %d KiB", n>>10)
	n = allocated(func() { rerr = Request(context.Background(), url, "GET", "/", "", 30*time.Second, nil) })
	assert.ErrorContains(t, rerr, "exceeded")
	assert.LessOrEqual(t, n, uint64(256<<10), "Request allocated %d KiB", n>>10)
}

func TestAMetricsAnswerOf4MiBCostsTheDaemonAtMost16MiB(t *testing.T) {
	for _, tc := range []struct {
		name, line, err string
		size            int
	}{
		{"short series", "llamacpp:requests_processing 1\n", "over 10000 lines", maxMetrics},
		{"families", "# TYPE a gauge\n", "over 10000 lines", maxMetrics},
		{"past the cap", "x", "over 4194304 bytes", answer256MiB},
	} {
		t.Run(tc.name, func(t *testing.T) {
			url := streaming(t, "HTTP/1.1 200 OK\r\n\r\n", tc.line, tc.size)
			var err error
			n := allocated(func() { _, _, err = Progress(context.Background(), url+"/metrics", 30*time.Second, nil) })
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.err)
			t.Logf("allocated %d KiB", n>>10)
			assert.LessOrEqual(t, n, uint64(16<<20), "allocated %d MiB", n>>20)
		})
	}
}

// The most lines parsed, each as costly as a line can be made within the
// byte cap, in each way a series may carry labels, still cost a bounded
// amount.
func TestTheLargestMetricsAnswerParsedCostsAtMost64MiB(t *testing.T) {
	for _, tc := range []struct{ name, open string }{
		{"labels after the name", "vllm:num_requests_running{"},
		{"labels after a blank", "  vllm:num_requests_running\t{"},
		{"name among the labels", `{"vllm:num_requests_running",`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b strings.Builder
			line := 0
			for b.Len() < maxMetrics-1024 && line < maxMetricsLines-1 {
				b.WriteString(tc.open)
				for i := range 60 {
					fmt.Fprintf(&b, "l%d=\"%d\",", i, line)
				}
				b.WriteString("} 1\n")
				line++
			}
			b.WriteString("llamacpp:tokens_predicted_total 1\n")
			url := streaming(t, "HTTP/1.1 200 OK\r\n\r\n", b.String(), b.Len())
			var err error
			var in float64
			n := allocated(func() { in, _, err = Progress(context.Background(), url+"/metrics", 30*time.Second, nil) })
			t.Logf("%d lines, %d bytes: allocated %d MiB", line, b.Len(), n>>20)
			require.NoError(t, err)
			assert.Equal(t, float64(line), in)
			assert.LessOrEqual(t, n, uint64(64<<20), "allocated %d MiB", n>>20)
		})
	}
}

// A redirect is the engine's answer, not somewhere to go: a probe stays
// on the engine's own socket.
func TestARedirectIsNotFollowed(t *testing.T) {
	elsewhere := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "llamacpp:requests_processing 0\nllamacpp:tokens_predicted_total 0\n")
	}))
	defer elsewhere.Close()
	redirect := func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, elsewhere.URL+r.URL.Path, http.StatusFound)
	}
	for _, tlsOn := range []bool{false, true} {
		srv := httptest.NewUnstartedServer(http.HandlerFunc(redirect))
		if tlsOn {
			srv.StartTLS()
		} else {
			srv.Start()
		}
		p := New(srv.URL+"/health", time.Second)
		if tlsOn {
			p.client.Transport.(*http.Transport).TLSClientConfig = &tls.Config{InsecureSkipVerify: true}
		}
		assert.ErrorContains(t, p.Probe(context.Background(), nil), "answered 302", "tls=%v", tlsOn)
		srv.Close()
	}
	srv := httptest.NewServer(http.HandlerFunc(redirect))
	defer srv.Close()
	_, _, err := Progress(context.Background(), srv.URL+"/metrics", time.Second, nil)
	assert.ErrorContains(t, err, "answered 302")
	err = Request(context.Background(), srv.URL, "POST", "/completion", `{"prompt":"x"}`, time.Second, nil)
	assert.ErrorContains(t, err, "answered 302")
}
