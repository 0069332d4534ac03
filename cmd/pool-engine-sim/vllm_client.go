package main

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

var (
	errEngineDead = errors.New("EngineCore encountered an issue. See stack trace (above) for the root cause.")
	errSleeping   = errors.New("the engine is sleeping")
)

// coreClient is the API server's side of the engine core: the child
// process, the socket to it, and the requests waiting on an answer.
type coreClient struct {
	cmd     *exec.Cmd
	conn    net.Conn
	onToken func()

	wmu sync.Mutex // guards enc
	enc *json.Encoder

	mu    sync.Mutex
	next  int64
	calls map[int64]chan coreMsg

	ready   chan coreMsg  // the engine core's ready message, once
	gone    chan struct{} // closed once the child has ended and been reaped
	state   *os.ProcessState
	closing atomic.Bool // the API server is stopping it
}

// startCore starts this binary again as the engine core, with its end of
// a socketpair as fd 3. Should the API server die without closing it,
// the parent-death signal and the end of the socket both end the child.
func startCore(o vllmOptions, onToken func()) (*coreClient, error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	mine := os.NewFile(uintptr(fds[0]), "engine-core")
	theirs := os.NewFile(uintptr(fds[1]), "api-server")
	defer theirs.Close()
	exe, err := os.Executable()
	if err != nil {
		_ = mine.Close()
		return nil, err
	}
	args := []string{"--engine", "vllm", "--engine-core", "--model", o.model,
		"--served-model-name", o.servedName,
		"--max-model-len", strconv.Itoa(o.maxModelLen),
		"--gpu-mem-mb", strconv.Itoa(o.gpuMemMB),
		"--token-time", o.tokenTime.String(),
		"--load-time", o.loadTime.String()}
	cmd := exec.Command(exe, args...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, os.Stdout, os.Stderr
	cmd.ExtraFiles = []*os.File{theirs} // fd 3
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		_ = mine.Close()
		return nil, err
	}
	conn, err := net.FileConn(mine)
	_ = mine.Close()
	if err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return nil, err
	}
	c := &coreClient{
		cmd: cmd, conn: conn, onToken: onToken,
		enc:   json.NewEncoder(conn),
		calls: map[int64]chan coreMsg{},
		ready: make(chan coreMsg, 1),
		gone:  make(chan struct{}),
	}
	go c.read()
	return c, nil
}

func (c *coreClient) pid() int { return c.cmd.Process.Pid }

// read dispatches the engine core's messages until its socket ends, then
// reaps it.
func (c *coreClient) read() {
	dec := json.NewDecoder(c.conn)
	for {
		var m coreMsg
		if err := dec.Decode(&m); err != nil {
			break
		}
		switch m.Op {
		case opReady:
			select {
			case c.ready <- m:
			default:
			}
		case opTok:
			c.onToken()
		default:
			c.mu.Lock()
			ch := c.calls[m.ID]
			c.mu.Unlock()
			if ch != nil {
				select {
				case ch <- m:
				default:
				}
			}
		}
	}
	_ = c.conn.Close()
	_ = c.cmd.Wait()
	c.state = c.cmd.ProcessState
	close(c.gone)
}

func (c *coreClient) dead() bool {
	select {
	case <-c.gone:
		return true
	default:
		return false
	}
}

// exitCode is the engine core's end as Python's multiprocessing reports
// it: the exit status, or minus the signal.
func (c *coreClient) exitCode() int {
	ws, ok := c.state.Sys().(syscall.WaitStatus)
	if ok && ws.Signaled() {
		return -int(ws.Signal())
	}
	return c.state.ExitCode()
}

func (c *coreClient) register() (int64, chan coreMsg) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.next++
	ch := make(chan coreMsg, 1)
	c.calls[c.next] = ch
	return c.next, ch
}

func (c *coreClient) unregister(id int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.calls, id)
}

func (c *coreClient) send(m coreMsg) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.enc.Encode(m)
}

// call sends m and waits for its answer.
func (c *coreClient) call(ctx context.Context, m coreMsg) (coreMsg, error) {
	id, ch := c.register()
	defer c.unregister(id)
	m.ID = id
	if err := c.send(m); err != nil {
		return coreMsg{}, errEngineDead
	}
	select {
	case r := <-ch:
		return r, nil
	case <-c.gone:
		// An answer sent just before the end is read before it.
		select {
		case r := <-ch:
			return r, nil
		default:
		}
		return coreMsg{}, errEngineDead
	case <-ctx.Done():
		return coreMsg{}, ctx.Err()
	}
}

// generate has the engine core produce n tokens and returns how many it
// made. The tokens are counted as they come (onToken).
func (c *coreClient) generate(ctx context.Context, shutdown <-chan struct{}, n int) (int, error) {
	id, ch := c.register()
	defer c.unregister(id)
	if err := c.send(coreMsg{Op: opGen, ID: id, N: n}); err != nil {
		return 0, errEngineDead
	}
	select {
	case r := <-ch:
		if r.Op == opErr {
			return r.N, errSleeping
		}
		return r.N, nil
	case <-c.gone:
		select {
		case r := <-ch:
			if r.Op == opErr {
				return r.N, errSleeping
			}
			return r.N, nil
		default:
		}
		return 0, errEngineDead
	case <-ctx.Done():
		_ = c.send(coreMsg{Op: opCancel, ID: id})
		return 0, ctx.Err()
	case <-shutdown:
		return 0, errShutdown
	}
}

// stop closes the socket, which ends the engine core, and kills it
// should it linger.
func (c *coreClient) stop() {
	c.closing.Store(true)
	_ = c.conn.Close()
	select {
	case <-c.gone:
	case <-time.After(5 * time.Second):
		_ = c.cmd.Process.Kill()
		<-c.gone
	}
}
