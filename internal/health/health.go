// Package health probes an engine's HTTP health endpoint the way
// llama-server and vLLM expose it: 200 is healthy, anything else (a 503
// while the model loads, an error, a timeout) is not.
package health

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"time"
)

// Prober probes one URL.
type Prober struct {
	URL     string
	Timeout time.Duration
	client  *http.Client
}

// New returns a prober; each probe gives up after timeout.
func New(url string, timeout time.Duration) *Prober {
	return &Prober{URL: url, Timeout: timeout, client: &http.Client{
		// A probe must not ride on a connection a hung engine holds.
		Transport: &http.Transport{DisableKeepAlives: true},
	}}
}

// Probe returns nil when the engine answers 200 within the timeout.
func (p *Prober) Probe(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, p.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.URL, nil)
	if err != nil {
		return err
	}
	resp, err := p.client.Do(req)
	if err != nil {
		if ctx.Err() == context.DeadlineExceeded {
			return fmt.Errorf("no answer from %s within %s", p.URL, p.Timeout)
		}
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 256))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s answered %d %s", p.URL, resp.StatusCode, string(body))
	}
	return nil
}
