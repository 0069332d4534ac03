package engine

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"

	"golang.org/x/sys/unix"

	"github.com/llorch/pool-managerd/internal/sockdiag"
)

// ErrGone is a process that ended before it could be looked at or
// signalled.
var ErrGone = errors.New("process gone")

// Process is a process held by a pidfd: what it says and what it is sent
// are of the process the pidfd was opened on, never of another that took
// its pid since. A process found by its pid alone (NVML's list, a scan of
// /proc) is judged and signalled this way.
type Process struct {
	PID int
	// UID is its real uid.
	UID uint32
	// Cgroup is its cgroup v2 path, "" where the host has none.
	Cgroup string
	// CgroupID is that cgroup's id (its kernfs handle), 0 where unknown.
	CgroupID uint64
	fd       int
}

// OpenProcess opens a pidfd of pid, then reads its uid and cgroup from
// /proc, then checks that the pidfd's process still runs: had it ended in
// between, /proc may have spoken of another process with its pid, and
// ErrGone says so.
func OpenProcess(pid int) (*Process, error) {
	if pid <= 0 {
		return nil, fmt.Errorf("pid %d: not a process", pid)
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if errors.Is(err, unix.ESRCH) {
		return nil, fmt.Errorf("pid %d: %w", pid, ErrGone)
	}
	if err != nil {
		return nil, fmt.Errorf("pid %d: pidfd_open: %w", pid, err)
	}
	p := &Process{PID: pid, fd: fd}
	dir := "/proc/" + strconv.Itoa(pid)
	uid, uerr := statusUID(dir + "/status")
	cg, cerr := cgroupPath(dir + "/cgroup")
	if p.exited() {
		p.Close()
		return nil, fmt.Errorf("pid %d: %w", pid, ErrGone)
	}
	if uerr != nil {
		p.Close()
		return nil, fmt.Errorf("pid %d: %w", pid, uerr)
	}
	p.UID = uid
	if cerr == nil {
		p.Cgroup = cg
		// A cgroup removed meanwhile has no id: unknown, so not ours.
		p.CgroupID, _ = sockdiag.CgroupIDOfPath(cg)
	}
	return p, nil
}

// statusUID reads the real uid from a /proc/PID/status.
func statusUID(path string) (uint32, error) {
	b, err := readProc(path)
	if err != nil {
		return 0, err
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if rest, ok := bytes.CutPrefix(sc.Bytes(), []byte("Uid:")); ok {
			f := bytes.Fields(rest)
			if len(f) == 0 {
				break
			}
			u, err := strconv.ParseUint(string(f[0]), 10, 32)
			if err != nil {
				break
			}
			return uint32(u), nil
		}
	}
	return 0, fmt.Errorf("%s: no Uid line", path)
}

// cgroupPath reads the cgroup v2 path ("0::" line) from a /proc/PID/cgroup.
func cgroupPath(path string) (string, error) {
	b, err := readProc(path)
	if err != nil {
		return "", err
	}
	for line := range bytes.Lines(b) {
		if p, ok := bytes.CutPrefix(bytes.TrimRight(line, "\n"), []byte("0::")); ok && len(p) > 0 && p[0] == '/' {
			return string(p), nil
		}
	}
	return "", sockdiag.ErrNoCgroup2
}

// printable quotes a path another user named (a cgroup of their own) where
// it has characters that would garble a log line.
func printable(s string) string {
	for _, r := range s {
		if !unicode.IsPrint(r) || r == utf8.RuneError {
			return strconv.QuoteToGraphic(s)
		}
	}
	return s
}

func readProc(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, 64<<10))
}

// exited says whether the pidfd's process has ended (a pidfd turns
// readable then).
func (p *Process) exited() bool {
	for {
		n, err := unix.Poll([]unix.PollFd{{Fd: int32(p.fd), Events: unix.POLLIN}}, 0)
		if err == unix.EINTR {
			continue
		}
		return err == nil && n > 0
	}
}

// Signal sends sig to the process through its pidfd. ErrGone: it has
// ended; an error wrapping EPERM: this process may not signal it.
func (p *Process) Signal(sig syscall.Signal) error {
	err := unix.PidfdSendSignal(p.fd, sig, nil, 0)
	if errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("pid %d: %w", p.PID, ErrGone)
	}
	if err != nil {
		return fmt.Errorf("signalling pid %d: %w", p.PID, err)
	}
	return nil
}

// Wait waits up to d for the process to end and says whether it did.
func (p *Process) Wait(d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		left := time.Until(deadline)
		if left < 0 {
			left = 0
		}
		n, err := unix.Poll([]unix.PollFd{{Fd: int32(p.fd), Events: unix.POLLIN}}, int(left.Milliseconds()))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return false
		}
		if n > 0 {
			return true
		}
		if left == 0 {
			return false
		}
	}
}

// Close gives the pidfd back.
func (p *Process) Close() {
	if p.fd >= 0 {
		unix.Close(p.fd)
		p.fd = -1
	}
}

// String names the process for LastError and the journal.
func (p *Process) String() string { return p.Named("") }

// Named is String with the process's command (as the caller found it,
// already bounded) first in the parentheses.
func (p *Process) Named(command string) string {
	cg := p.Cgroup
	if cg == "" {
		cg = "unknown"
	}
	if command != "" {
		command += ", "
	}
	return fmt.Sprintf("pid %d (%suid %d, cgroup %s)", p.PID, command, p.UID, printable(cg))
}
