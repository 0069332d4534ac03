package shim

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode/utf8"
)

// versionTimeout bounds a VersionCommand: one that initialises a GPU
// runtime takes seconds, one that hangs must not linger in the scope.
const versionTimeout = 10 * time.Second

// versionRun is the pool's VersionCommand, started beside the engine.
type versionRun struct {
	cmd  *exec.Cmd
	out  *headBuffer
	err  error
	argv string
}

// startVersion starts argv with the engine's environment and account. It
// is called on the thread that set no_new_privs, which the child inherits;
// one that runs without it is killed.
func startVersion(argv, env []string, cred *syscall.Credential) *versionRun {
	v := &versionRun{out: &headBuffer{max: MaxLine}, argv: strings.Join(argv, " ")}
	v.cmd = exec.Command(argv[0], argv[1:]...)
	v.cmd.Env = env
	v.cmd.Dir = "/"
	v.cmd.Stdout, v.cmd.Stderr = v.out, v.out
	v.cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	if err := v.cmd.Start(); err != nil {
		v.err, v.cmd = err, nil
		return v
	}
	if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", v.cmd.Process.Pid)); err != nil || !bytes.Contains(st, []byte("\nNoNewPrivs:\t1\n")) {
		v.cmd.Process.Kill()
		v.cmd.Wait()
		v.err, v.cmd = errors.New("it would run without no_new_privs"), nil
	}
	return v
}

// wait waits for the command, within versionTimeout, and says what it
// printed (the head of its output) or why it failed.
func (v *versionRun) wait() Message {
	fail := func(err error) Message {
		return Message{Event: EventVersion, Error: bound(fmt.Sprintf("VersionCommand %s: %v", v.argv, err))}
	}
	if v.cmd == nil {
		return fail(v.err)
	}
	done := make(chan error, 1)
	go func() { done <- v.cmd.Wait() }()
	var err error
	select {
	case err = <-done:
	case <-time.After(versionTimeout):
		v.cmd.Process.Kill()
		<-done
		err = fmt.Errorf("no answer within %s", versionTimeout)
	}
	if err != nil {
		return fail(err)
	}
	out := bound(v.out.String())
	if strings.TrimSpace(out) == "" {
		return fail(errors.New("printed nothing"))
	}
	return Message{Event: EventVersion, Line: out}
}

// bound makes s valid UTF-8 of at most MaxLine bytes.
func bound(s string) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	for len(s) > MaxLine {
		_, n := utf8.DecodeLastRuneInString(s)
		s = s[:len(s)-n]
	}
	return s
}

// headBuffer keeps the first max bytes written to it and takes the rest
// without keeping it: the command never blocks on its output.
type headBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (h *headBuffer) Write(p []byte) (int, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if room := h.max - len(h.b); room > 0 {
		h.b = append(h.b, p[:min(room, len(p))]...)
	}
	return len(p), nil
}

func (h *headBuffer) String() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return string(h.b)
}
