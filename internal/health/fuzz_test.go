package health

import (
	"context"
	"io"
	"net"
	"net/http"
	"testing"
	"time"
)

// FuzzHealthAnswer feeds arbitrary bytes to a probe as the engine's whole
// answer: no panic, and what one answer costs stays bounded.
func FuzzHealthAnswer(f *testing.F) {
	f.Add([]byte("HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{\"status\":\"ok\"}"))
	f.Add([]byte("HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"))
	f.Add([]byte("HTTP/1.1 302 Found\r\nLocation: http://elsewhere/\r\n\r\n"))
	f.Add([]byte("SSH-2.0-OpenSSH\r\n"))
	p := New("http://engine/health", time.Second)
	f.Fuzz(func(t *testing.T, data []byte) {
		r := &repeating{data: data, left: 1 << 20}
		n := allocated(func() {
			resp, err := readAnswer(r)
			if err != nil {
				return
			}
			p.judge(resp)
			resp.Body.Close()
		})
		if n > 1<<20 {
			t.Fatalf("one answer allocated %d KiB", n>>10)
		}
	})
}

// repeating is data over and over, left bytes in all: an answer larger
// than any fuzz input.
type repeating struct {
	data []byte
	off  int
	left int
}

func (r *repeating) Read(p []byte) (int, error) {
	if len(r.data) == 0 || r.left <= 0 {
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), r.left)], r.data[r.off:])
	r.off = (r.off + n) % len(r.data)
	r.left -= n
	return n, nil
}

// FuzzMetricsAnswer feeds arbitrary bytes, through net/http's client as
// Progress uses it, as the engine's whole answer to a metrics scrape: no
// panic, and what one scrape costs stays bounded.
func FuzzMetricsAnswer(f *testing.F) {
	f.Add([]byte("HTTP/1.1 200 OK\r\nContent-Length: 63\r\n\r\nllamacpp:requests_processing 1\nllamacpp:tokens_predicted_total 2\n"))
	f.Add([]byte("HTTP/1.1 200 OK\r\n\r\nvllm:num_requests_running{model_name=\"a\\\"}\"} 1\nvllm:generation_tokens_total{a=\"b\",} 2\n"))
	f.Add([]byte("HTTP/1.1 200 OK\r\n\r\n# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing{ 1\n"))
	f.Add([]byte("HTTP/1.1 301 Moved\r\nLocation: /x\r\n\r\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		tr := transport.Clone()
		tr.DialContext = func(context.Context, string, string) (net.Conn, error) {
			daemon, engine := net.Pipe()
			go func() {
				go io.Copy(io.Discard, engine)
				io.Copy(engine, &repeating{data: data, left: maxMetrics + maxHead + 1})
				engine.Close()
			}()
			return daemon, nil
		}
		client := &http.Client{Transport: tr, CheckRedirect: noRedirect}
		n := allocated(func() {
			ctx := context.Background()
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://engine/metrics", nil)
			if err != nil {
				t.Fatal(err)
			}
			progress(ctx, client, req, "http://engine/metrics", 5*time.Second)
		})
		if n > 64<<20 {
			t.Fatalf("one scrape allocated %d MiB", n>>20)
		}
	})
}
