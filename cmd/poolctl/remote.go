package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"

	"github.com/godbus/dbus/v5"

	"github.com/llorch/pool-managerd/internal/safetext"
)

// checkHost refuses what ssh would take for an option or that would
// break the bus address systemctl builds from it.
func checkHost(h string) error {
	switch {
	case h == "":
		return errors.New("-H: empty host name")
	case strings.HasPrefix(h, "-"):
		return fmt.Errorf("-H %q: a host name does not start with '-'", h)
	case strings.ContainsFunc(h, func(r rune) bool { return r <= ' ' || r == 0x7f || r == ',' }):
		return fmt.Errorf("-H %q: a host name holds no spaces or control characters", h)
	}
	return nil
}

// sshArgs are the arguments of ssh that reach host as systemctl -H does
// (sd-bus's "unixexec:path=ssh,argv1=-xT,..."): no X11, no terminal;
// HOST:PORT is ssh's -p and [V6ADDR] a bracketed address.
func sshArgs(host string) []string {
	args := []string{"-xT"}
	h := host
	user := ""
	if i := strings.LastIndexByte(h, '@'); i >= 0 {
		user, h = h[:i+1], h[i+1:]
	}
	if strings.HasPrefix(h, "[") {
		if end := strings.IndexByte(h, ']'); end > 0 {
			rest := h[end+1:]
			h = h[1:end]
			if port, ok := strings.CutPrefix(rest, ":"); ok && port != "" {
				args = append(args, "-p", port)
			}
		}
	} else if i := strings.IndexByte(h, ':'); i >= 0 && strings.Count(h, ":") == 1 {
		args = append(args, "-p", h[i+1:])
		h = h[:i]
	}
	return append(args, "--", user+h)
}

// bridgeCommand is what runs on the remote host: systemd-stdio-bridge
// speaks for its system bus (its default) over stdin and stdout.
const bridgeCommand = "systemd-stdio-bridge"

// pipeConn is ssh's stdout and stdin as one connection; closing it ends
// ssh.
type pipeConn struct {
	io.Reader
	io.WriteCloser
	cmd    *exec.Cmd
	stderr *lineEscaper
	once   sync.Once
}

func (p *pipeConn) Close() error {
	p.once.Do(func() {
		p.WriteCloser.Close()
		done := make(chan struct{})
		go func() { p.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			p.cmd.Process.Kill()
			<-done
		}
		p.stderr.flush()
	})
	return nil
}

// dialHost connects to host's system bus through ssh and the stdio
// bridge; ssh's own messages (a host key prompt, a refusal) go to stderr.
func dialHost(host string, stderr io.Writer) (*dbus.Conn, error) {
	cmd := exec.Command("ssh", append(sshArgs(host), bridgeCommand)...)
	esc := &lineEscaper{w: stderr}
	cmd.Stderr = esc
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("cannot run ssh: %w", err)
	}
	pc := &pipeConn{Reader: out, WriteCloser: in, cmd: cmd, stderr: esc}
	conn, err := dbus.NewConn(pc)
	if err != nil {
		pc.Close()
		return nil, err
	}
	// A pipe carries no credentials: the bridge, an ordinary client of
	// the remote bus as the ssh user, takes the anonymous mechanism.
	if err := conn.Auth([]dbus.Auth{dbus.AuthExternal(fmt.Sprint(os.Getuid())), dbus.AuthAnonymous()}); err != nil {
		conn.Close()
		return nil, err
	}
	if err := conn.Hello(); err != nil {
		conn.Close()
		return nil, err
	}
	return conn, nil
}

// remoteCommand is argv run on host through ssh, quoted for the remote
// shell that ssh hands its command line to.
func remoteCommand(host string, argv []string) *exec.Cmd {
	quoted := make([]string, len(argv))
	for i, a := range argv {
		quoted[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
	}
	return exec.Command("ssh", append(sshArgs(host), strings.Join(quoted, " "))...)
}

// lineEscaper passes another program's messages (ssh's, journalctl's) on
// a line at a time, escaped: a remote host or a journal file may hold any
// bytes, and none of them may drive the operator's terminal.
type lineEscaper struct {
	mu      sync.Mutex
	w       io.Writer
	partial []byte
}

func (e *lineEscaper) Write(p []byte) (int, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.partial = append(e.partial, p...)
	for {
		i := bytes.IndexByte(e.partial, '\n')
		if i < 0 {
			break
		}
		fmt.Fprintln(e.w, safetext.Line(string(e.partial[:i])))
		e.partial = e.partial[i+1:]
	}
	if len(e.partial) > 64<<10 {
		e.flushLocked()
	}
	return len(p), nil
}

// flush writes a last line that had no newline.
func (e *lineEscaper) flush() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.flushLocked()
}

func (e *lineEscaper) flushLocked() {
	if len(e.partial) > 0 {
		fmt.Fprintln(e.w, safetext.Line(string(e.partial)))
		e.partial = nil
	}
}
