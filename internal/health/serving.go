package health

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// The engines' own names for requests in flight and tokens produced:
// llama.cpp's server, then vLLM's.
// llama.cpp adds to tokens_predicted_total only when a request ends, so
// its per-step n_decode_total comes first: a long generation moves it.
var (
	InFlightMetrics = []string{"llamacpp:requests_processing", "vllm:num_requests_running"}
	TokenMetrics    = []string{"llamacpp:n_decode_total", "llamacpp:tokens_predicted_total", "vllm:generation_tokens_total"}
)

// ErrNoAnswer is an endpoint that did not answer in time: an engine whose
// decode loop is stuck may keep /health but not /metrics.
var ErrNoAnswer = errors.New("no answer")

// maxMetrics bounds what is read of an engine's metrics: its answer is the
// engine's text, and a daemon reading it every interval must not be made
// to hold more.
const maxMetrics = 4 << 20

// maxMetricsLines bounds the lines of an engine's metrics that are parsed:
// the parser's cost is per line (a family or a series each), many times
// the bytes of a short line.
const maxMetricsLines = 10000

// transport serves the reads and requests below.
var transport = newTransport()

// Progress reads an engine's Prometheus endpoint: the requests it has in
// flight and the tokens it has produced so far (each summed over its
// series). An answer without either is an error. v, when set, must accept
// the answering socket first.
func Progress(ctx context.Context, rawURL string, timeout time.Duration, v Verify) (inFlight, tokens float64, err error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, rawURL, nil)
	if err != nil {
		return 0, 0, err
	}
	return progress(ctx, clientFor(transport, v), req, rawURL, timeout)
}

// progress is Progress's answer read through client.
func progress(ctx context.Context, client *http.Client, req *http.Request, rawURL string, timeout time.Duration) (inFlight, tokens float64, err error) {
	resp, err := client.Do(req)
	if err != nil {
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return 0, 0, fmt.Errorf("%s: %w within %s", rawURL, ErrNoAnswer, timeout)
		}
		return 0, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, 0, fmt.Errorf("%s answered %d", rawURL, resp.StatusCode)
	}
	text, err := readAtMost(resp.Body, maxMetrics+1)
	if err != nil {
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return 0, 0, fmt.Errorf("%s: %w within %s", rawURL, ErrNoAnswer, timeout)
		}
		return 0, 0, fmt.Errorf("%s: %w", rawURL, err)
	}
	if len(text) > maxMetrics {
		return 0, 0, fmt.Errorf("%s: answer over %d bytes", rawURL, maxMetrics)
	}
	if n := bytes.Count(text, []byte("\n")); n > maxMetricsLines {
		return 0, 0, fmt.Errorf("%s: answer over %d lines", rawURL, maxMetricsLines)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(bytes.NewReader(withoutLabels(text)))
	if err != nil {
		return 0, 0, fmt.Errorf("%s: not Prometheus text: %w", rawURL, err)
	}
	inFlight, okIn := sum(fams, InFlightMetrics)
	tokens, okTok := sum(fams, TokenMetrics)
	if !okIn || !okTok {
		return 0, 0, fmt.Errorf("%s has no %s and %s", rawURL, strings.Join(InFlightMetrics, " or "), strings.Join(TokenMetrics, " or "))
	}
	return inFlight, tokens, nil
}

// readAtMost reads r to its end or to n bytes. Its buffer doubles, where
// io.ReadAll's grows by a quarter: reading 4 MiB costs 8 MiB, not 20.
func readAtMost(r io.Reader, n int) ([]byte, error) {
	b := make([]byte, 0, min(n, 64<<10))
	for {
		if len(b) == cap(b) {
			b = append(make([]byte, 0, min(n, 2*cap(b))), b...)
		}
		m, err := r.Read(b[len(b):min(cap(b), n)])
		b = b[:len(b)+m]
		if err == io.EOF || len(b) >= n {
			return b, nil
		}
		if err != nil {
			return b, err
		}
	}
}

// withoutLabels is text with each series' labels cut out: only its
// family's total is wanted, and the parser's cost grows with a line's
// labels far faster than with its bytes (4 MiB of label pairs cost it
// close to 1 GiB). A series named inside its braces keeps only its name. A
// line whose labels do not close is kept whole, for the parser to refuse.
func withoutLabels(text []byte) []byte {
	out := make([]byte, 0, len(text))
	for len(text) > 0 {
		line := text
		if i := bytes.IndexByte(text, '\n'); i >= 0 {
			line, text = text[:i+1], text[i+1:]
		} else {
			text = nil
		}
		body := bytes.TrimLeft(line, " \t")
		name := bytes.IndexAny(body, " \t{")
		if len(body) == 0 || body[0] == '#' || name < 0 {
			out = append(out, line...)
			continue
		}
		open := name + len(body[name:]) - len(bytes.TrimLeft(body[name:], " \t"))
		if open >= len(body) || body[open] != '{' {
			out = append(out, line...)
			continue
		}
		end := labelsEnd(body[open:])
		if end < 0 {
			out = append(out, line...)
			continue
		}
		rest := body[open+end+1:]
		if name > 0 {
			out = append(out, body[:name]...)
			out = append(out, rest...)
			continue
		}
		// {"name", labels...}: the quoted name alone.
		q := quotedEnd(body[1:])
		if q < 0 {
			out = append(out, line...)
			continue
		}
		out = append(out, body[:q+2]...)
		out = append(out, '}')
		out = append(out, rest...)
	}
	return out
}

// labelsEnd is the index of the brace closing the label set that s opens,
// or -1.
func labelsEnd(s []byte) int {
	quoted := false
	for i := 1; i < len(s); i++ {
		switch c := s[i]; {
		case quoted && c == '\\':
			i++
		case c == '"':
			quoted = !quoted
		case !quoted && c == '}':
			return i
		case c == '\n':
			return -1
		}
	}
	return -1
}

// quotedEnd is the index of the quote closing the string s starts with, or
// -1 where s starts with none.
func quotedEnd(s []byte) int {
	if len(s) == 0 || s[0] != '"' {
		return -1
	}
	for i := 1; i < len(s); i++ {
		switch s[i] {
		case '\\':
			i++
		case '"':
			return i
		case '\n':
			return -1
		}
	}
	return -1
}

func sum(fams map[string]*dto.MetricFamily, names []string) (float64, bool) {
	for _, n := range names {
		f, ok := fams[n]
		if !ok {
			continue
		}
		total := 0.0
		for _, m := range f.GetMetric() {
			switch {
			case m.GetCounter() != nil:
				total += m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				total += m.GetGauge().GetValue()
			case m.GetUntyped() != nil:
				total += m.GetUntyped().GetValue()
			}
		}
		return total, true
	}
	return 0, false
}

// Request sends one request (a warm-up) to the engine at base's scheme and
// host; anything but a 2xx answer within timeout is an error. v, when set,
// must accept the answering socket first.
func Request(ctx context.Context, base, method, path, body string, timeout time.Duration, v Verify) error {
	u, err := url.Parse(base)
	if err != nil {
		return err
	}
	target := u.Scheme + "://" + u.Host + path
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, target, rd)
	if err != nil {
		return err
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := clientFor(transport, v).Do(req)
	if err != nil {
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return fmt.Errorf("%s %s: no answer within %s", method, path, timeout)
		}
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 256))
	io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("%s %s answered %d %s", method, path, resp.StatusCode, strings.TrimSpace(string(msg)))
	}
	return nil
}
