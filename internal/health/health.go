// Package health probes an engine's HTTP health endpoint the way
// llama-server and vLLM expose it: 200 is healthy, anything else (a 503
// while the model loads, an error, a timeout) is not.
package health

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"time"
)

// Verify checks the engine end of a probe's connection (from local to
// remote) before anything is sent on it; an error fails the probe. A
// probe answered by whoever squats the engine's port must not count; nil
// verifies nothing.
type Verify func(local, remote netip.AddrPort) error

// dial connects and, with v set, verifies the peer.
func dial(ctx context.Context, network, addr string, v Verify) (net.Conn, error) {
	// No TCP keep-alive: the connection lives for one answer.
	d := net.Dialer{KeepAlive: -1}
	c, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	if v != nil {
		local, lok := c.LocalAddr().(*net.TCPAddr)
		if remote, ok := c.RemoteAddr().(*net.TCPAddr); ok && lok {
			err = v(local.AddrPort(), remote.AddrPort())
		} else {
			err = fmt.Errorf("peer %s is not a TCP address", c.RemoteAddr())
		}
		if err != nil {
			c.Close()
			return nil, err
		}
	}
	return c, nil
}

// An engine's answer is its own text, read by a root daemon many times a
// minute: each part of it is bounded before it is parsed.
const (
	// maxHead bounds an answer's status line and headers together.
	maxHead = 16 << 10
	// maxBody bounds what is read of a health answer's body.
	maxBody = 64 << 10
)

// errHeadTooLarge and errBodyTooLarge end a read past its bound.
var (
	errHeadTooLarge = fmt.Errorf("answer's status line and headers over %d bytes", maxHead)
	errBodyTooLarge = fmt.Errorf("answer's body over %d bytes", maxBody)
)

// bounded reads at most n more bytes of r, then fails with err.
type bounded struct {
	r   io.Reader
	n   int64
	err error
}

func (b *bounded) Read(p []byte) (int, error) {
	if b.n <= 0 {
		return 0, b.err
	}
	if int64(len(p)) > b.n {
		p = p[:b.n]
	}
	n, err := b.r.Read(p)
	b.n -= int64(n)
	return n, err
}

// newTransport is a transport whose connections live for one answer.
func newTransport() *http.Transport {
	return &http.Transport{DisableKeepAlives: true, MaxResponseHeaderBytes: maxHead,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return dial(ctx, network, addr, nil)
		}}
}

// noRedirect keeps a client on the engine it asked: a redirect is the
// answer, not a place to go.
func noRedirect(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }

// clientFor is a client on base's settings whose connections verify their
// peer with v: one for each verified request, so that the peer check is
// the caller's argument (no transport pool to keep: each connection is
// closed after its answer).
func clientFor(base *http.Transport, v Verify) *http.Client {
	if v == nil {
		return &http.Client{Transport: base, CheckRedirect: noRedirect}
	}
	t := base.Clone()
	t.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		return dial(ctx, network, addr, v)
	}
	return &http.Client{Transport: t, CheckRedirect: noRedirect}
}

// Prober probes one URL. Each probe is a new connection, closed after the
// answer (as kubelet's probes do): a probe must not ride on a connection a
// hung engine holds, nor hold one of the engine's HTTP workers between
// probes.
type Prober struct {
	URL     string
	Timeout time.Duration
	// addr and request are set for http:// URLs, which are probed with
	// one request written on a plain connection: a daemon probing many
	// pools spends most of its idle time here, and net/http's transport
	// costs two goroutines and a connection pool per probe. https:// goes
	// through client.
	addr    string
	request []byte
	client  *http.Client
}

// New returns a prober; each probe gives up after timeout.
func New(rawURL string, timeout time.Duration) *Prober {
	p := &Prober{URL: rawURL, Timeout: timeout}
	u, err := url.Parse(rawURL)
	if err == nil && u.Scheme == "http" && u.Host != "" && u.User == nil {
		p.addr = u.Host
		if u.Port() == "" {
			p.addr = net.JoinHostPort(u.Hostname(), "80")
		}
		p.request = []byte("GET " + u.RequestURI() + " HTTP/1.1\r\nHost: " + u.Host +
			"\r\nUser-Agent: pool-managerd\r\nAccept: */*\r\nConnection: close\r\n\r\n")
		return p
	}
	p.client = &http.Client{Transport: newTransport(), CheckRedirect: noRedirect}
	return p
}

// Probe returns nil when the engine answers 200 within the timeout; v,
// when set, must accept the answering socket first.
func (p *Prober) Probe(ctx context.Context, v Verify) error {
	ctx, cancel := context.WithTimeout(ctx, p.Timeout)
	defer cancel()
	var resp *http.Response
	var err error
	if p.client != nil {
		resp, err = p.viaClient(ctx, v)
	} else {
		var c net.Conn
		c, resp, err = p.plain(ctx, v)
		if c != nil {
			defer c.Close()
		}
	}
	if err != nil {
		if ctx.Err() == context.DeadlineExceeded || errors.Is(err, os.ErrDeadlineExceeded) {
			return fmt.Errorf("no answer from %s within %s", p.URL, p.Timeout)
		}
		return err
	}
	defer resp.Body.Close()
	return p.judge(resp)
}

// judge is the verdict on an answer's head: 200 is healthy; otherwise the
// error quotes the start of the body.
func (p *Prober) judge(resp *http.Response) error {
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 256))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s answered %d %s", p.URL, resp.StatusCode, string(body))
	}
	return nil
}

func (p *Prober) viaClient(ctx context.Context, v Verify) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.URL, nil)
	if err != nil {
		return nil, err
	}
	return clientFor(p.client.Transport.(*http.Transport), v).Do(req)
}

// plain sends the request on a new connection and reads the answer's
// head; the caller closes the connection.
func (p *Prober) plain(ctx context.Context, v Verify) (net.Conn, *http.Response, error) {
	c, err := dial(ctx, "tcp", p.addr, v)
	if err != nil {
		return nil, nil, fmt.Errorf("GET %s: %w", p.URL, err)
	}
	deadline, _ := ctx.Deadline()
	c.SetDeadline(deadline)
	// A cancelled probe (the engine is being stopped) ends at once.
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, err := c.Write(p.request); err != nil {
		return c, nil, fmt.Errorf("GET %s: %w", p.URL, err)
	}
	resp, err := readAnswer(c)
	if err != nil {
		return c, nil, fmt.Errorf("GET %s: %w", p.URL, err)
	}
	return c, resp, nil
}

// readAnswer reads an answer's head from r within maxHead bytes; its body
// then reads within maxBody more.
func readAnswer(r io.Reader) (*http.Response, error) {
	b := &bounded{r: r, n: maxHead, err: errHeadTooLarge}
	resp, err := http.ReadResponse(bufio.NewReaderSize(b, 1024), nil)
	if err != nil {
		return nil, err
	}
	b.n, b.err = maxBody, errBodyTooLarge
	return resp, nil
}
