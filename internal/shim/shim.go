// Package shim is the engine's parent inside its scope. It is kept apart
// from the daemon so that the shim binary, pool-managerd-shim, links only
// what it needs: it starts in a fraction of the daemon's start-up time (it
// is on the path of every restart) and stays small for the engine's life.
package shim

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode/utf8"

	"golang.org/x/sys/unix"

	"github.com/llorch/pool-managerd/internal/crash"
)

// Env carries the shim's instructions; its presence makes a binary that
// calls Main first (the daemon, a test) act as the shim.
const Env = "POOL_MANAGERD_SHIM"

// Is reports whether this process was started as an engine shim.
func Is() bool { return os.Getenv(Env) != "" }

// Spec is what the daemon tells the shim. The daemon resolves the user:
// the shim links no NSS and loads no libraries on the way to the engine.
type Spec struct {
	Argv   []string `json:"argv"`
	Env    []string `json:"env"`
	User   string   `json:"user"`
	UID    uint32   `json:"uid"`
	GID    uint32   `json:"gid"`
	Groups []uint32 `json:"groups"`
	Home   string   `json:"home"`
	// Note is the daemon's, given back with "started" to a daemon that
	// reattaches: what it needs to adopt an engine that has no runtime
	// record yet (it was still starting).
	Note json.RawMessage `json:"note,omitempty"`
	// Socket is where a restarted daemon reattaches to the shim.
	Socket string `json:"socket,omitempty"`
	// Version is the pool's VersionCommand: run beside the engine, as
	// its user, in its scope, with no new privileges; never as the
	// daemon (engines are installed where their own users can write).
	Version []string `json:"version,omitempty"`
}

// Main is the small process that becomes the engine's parent inside the
// engine's scope. Started by the daemon, it waits on fd 3 until the daemon
// has moved it into the scope, so the engine never runs outside it; then
// it drops to the engine's user, starts the engine with no new privileges,
// forwards its output to the journal (attributed to the scope, because the
// shim connects from inside it) while watching for GPU faults, and reports
// on fd 4: the engine's PID, faults, and how it ended, with the scope's
// OOM kill count read while the cgroup still exists.
func Main() int {
	// Nothing the shim inherited beyond stdio (its pipes from the daemon,
	// whatever the daemon itself inherited) may reach the engine.
	closeOnExecFrom(3)
	status := os.NewFile(4, "status")
	out := &reporter{w: status, delivered: make(chan struct{})}
	report := out.report
	fail := func(err error) int {
		report(Message{Event: EventError, Error: err.Error()})
		fmt.Fprintln(os.Stderr, "pool-managerd shim:", err)
		return 1
	}
	var spec Spec
	if err := json.Unmarshal([]byte(os.Getenv(Env)), &spec); err != nil || len(spec.Argv) == 0 {
		return fail(fmt.Errorf("bad instructions: %v", err))
	}
	os.Unsetenv(Env)
	// systemd signals every process of the scope on stop; the shim
	// outlives the engine to report on it. Catching (not ignoring) keeps
	// the engine's own dispositions default across exec.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGPIPE)
	go func() {
		for range sigs {
		}
	}()

	goAhead := os.NewFile(3, "go")
	if _, err := io.ReadFull(goAhead, make([]byte, 1)); err != nil {
		return fail(errors.New("no go-ahead from the daemon"))
	}
	goAhead.Close()
	// no_new_privs is a thread's, and a child inherits the forking
	// thread's: the engine is forked from this thread, kept for it.
	runtime.LockOSThread()
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fail(fmt.Errorf("no_new_privs: %w", err))
	}
	ident := filepath.Base(spec.Argv[0])
	outW, outLog := output(ident, 6)
	errW, errLog := output(ident, 6)
	oomAt := OOMFile("self")
	oomBefore := OOMKills(oomAt)

	cmd := exec.Command(spec.Argv[0], spec.Argv[1:]...)
	cmd.Env = append([]string{
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME=" + spec.Home, "USER=" + spec.User, "LOGNAME=" + spec.User,
	}, spec.Env...)
	cmd.Dir = "/"
	outR, outPipe, _ := os.Pipe()
	errR, errPipe, _ := os.Pipe()
	cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, outPipe, errPipe
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: spec.UID, Gid: spec.GID, Groups: spec.Groups}}
	err := cmd.Start()
	var version *versionRun
	if err == nil && len(spec.Version) > 0 {
		// From the same thread: it has no_new_privs too.
		version = startVersion(spec.Version, cmd.Env, cmd.SysProcAttr.Credential)
	}
	runtime.UnlockOSThread()
	if err != nil {
		return fail(fmt.Errorf("start %s: %w", spec.Argv[0], err))
	}
	// The child has it from the fork on: an engine without it is killed
	// before it has run.
	if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", cmd.Process.Pid)); err != nil || !bytes.Contains(st, []byte("\nNoNewPrivs:\t1\n")) {
		cmd.Process.Kill()
		cmd.Wait()
		return fail(errors.New("the engine would run without no_new_privs"))
	}
	outPipe.Close()
	errPipe.Close()
	// The OOM killer must pick the engine, never its reporter; where the
	// host denies it (no CAP_SYS_RESOURCE) the daemon reads the scope's
	// OOM count itself should the shim go with the engine.
	os.WriteFile("/proc/self/oom_score_adj", []byte("-1000"), 0)
	report(Message{Event: EventStarted, PID: cmd.Process.Pid, Note: spec.Note})
	if version != nil {
		go func() { report(version.wait()) }()
	}
	if spec.Socket != "" {
		go out.serve(spec.Socket)
	}

	var mu sync.Mutex
	faulted := false
	var wg sync.WaitGroup
	forward := func(r *os.File, w io.Writer) {
		defer wg.Done()
		var scan crash.FaultScanner
		forwardLines(r, w, func(line []byte) {
			f, ok := scan.Line(line)
			if !ok {
				return
			}
			mu.Lock()
			first := !faulted
			faulted = true
			mu.Unlock()
			if first {
				report(Message{Event: EventFault, Line: f})
			}
		})
	}
	wg.Add(2)
	go forward(outR, outW)
	go forward(errR, errW)

	if err := cmd.Wait(); err != nil && cmd.ProcessState == nil {
		return fail(err)
	}
	ws, _ := cmd.ProcessState.Sys().(syscall.WaitStatus)
	// Everything the engine wrote is in the pipes now; a child it left
	// behind may hold them open, so do not wait for EOF past a moment.
	deadline := time.Now().Add(100 * time.Millisecond)
	outR.SetReadDeadline(deadline)
	errR.SetReadDeadline(deadline)
	wg.Wait()
	outLog()
	errLog()
	report(Message{Event: EventExit, Status: uint32(ws), OOMKills: max(OOMKills(oomAt), oomBefore) - oomBefore})
	// If no daemon heard the exit (it is restarting), wait a while for one
	// to reattach: the crash must not go unseen.
	select {
	case <-out.delivered:
	case <-time.After(2 * time.Minute):
	}
	if spec.Socket != "" {
		os.Remove(spec.Socket)
	}
	return 0
}

// reporter sends the shim's messages to the daemon that started it and to
// any daemon that reattaches later; a late one first gets what it missed.
type reporter struct {
	mu        sync.Mutex
	w         io.Writer // the starting daemon's pipe, nil once broken
	clients   []*os.File
	started   *Message
	version   *Message
	fault     *Message
	exit      *Message
	delivered chan struct{}
	once      sync.Once
}

func (r *reporter) report(m Message) {
	b := m.Encode()
	r.mu.Lock()
	defer r.mu.Unlock()
	switch m.Event {
	case EventStarted:
		r.started = &m
	case EventVersion:
		r.version = &m
	case EventFault:
		r.fault = &m
	case EventExit:
		r.exit = &m
	}
	sent := false
	if r.w != nil {
		// The daemon may be gone (restarting): the engine must not be.
		if _, err := r.w.Write(b); err != nil {
			r.w = nil
		} else {
			sent = true
		}
	}
	live := r.clients[:0]
	for _, c := range r.clients {
		if _, err := c.Write(b); err == nil {
			live = append(live, c)
			sent = true
		} else {
			c.Close()
		}
	}
	r.clients = live
	if m.Event == EventExit && sent {
		r.once.Do(func() { close(r.delivered) })
	}
}

// The shim's sockets are plain system calls rather than package net: net
// would link the C library's resolver, and the shim is a static binary
// that starts in a few milliseconds.

// serve accepts reattaching daemons on a unix socket only root can reach.
func (r *reporter) serve(path string) {
	os.Remove(path)
	l, err := listenUnix(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, "pool-managerd shim: no reattach socket:", err)
		return
	}
	for {
		fd, _, err := unix.Accept4(l, unix.SOCK_CLOEXEC)
		if err == unix.EINTR || err == unix.ECONNABORTED {
			continue
		}
		if err != nil {
			return
		}
		c := os.NewFile(uintptr(fd), "daemon")
		r.mu.Lock()
		ok := true
		for _, m := range []*Message{r.started, r.version, r.fault, r.exit} {
			if m == nil {
				continue
			}
			if _, err := c.Write(m.Encode()); err != nil {
				ok = false
				break
			}
		}
		if ok {
			r.clients = append(r.clients, c)
			if r.exit != nil {
				r.once.Do(func() { close(r.delivered) })
			}
		} else {
			c.Close()
		}
		r.mu.Unlock()
	}
}

func listenUnix(path string) (int, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	// Only root may reattach; nobody can connect before the listen, so
	// the mode is set in between.
	err = unix.Bind(fd, &unix.SockaddrUnix{Name: path})
	if err == nil {
		err = os.Chmod(path, 0o600)
	}
	if err == nil {
		err = unix.Listen(fd, 8)
	}
	if err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("%s: %w", path, err)
	}
	return fd, nil
}

func dialUnix(path string) (*os.File, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	if err := unix.Connect(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return os.NewFile(uintptr(fd), path), nil
}

// output opens a journal stream for the engine's output, as systemd does
// for a service's StandardOutput=journal; journald attributes it to the
// cgroup of the connecting process: the engine's scope. Without journald
// the output goes to the shim's stderr.
func output(ident string, priority int) (io.Writer, func()) {
	c, err := dialUnix("/run/systemd/journal/stdout")
	if err != nil {
		return os.Stderr, func() {}
	}
	// identifier, unit id, priority, level prefix, forward to syslog,
	// kmsg, console.
	fmt.Fprintf(c, "%s\n\n%d\n0\n0\n0\n0\n", ident, priority)
	unix.Shutdown(int(c.Fd()), unix.SHUT_RD)
	return c, func() { c.Close() }
}

// OOMFile is the OOM kill counter of the memory cgroup process pid is in
// ("self": the caller), v2 or v1 ("" if none). The shim finds its own (the
// scope's) before the engine starts: an engine may move the shim beneath
// the scope (podman run --cgroups=split), and the scope's counter is the
// one that counts kills anywhere beneath it. The daemon reads the scope's
// counter too, from outside: the shim is in the memory cgroup that is at
// its limit, and the kernel may kill it (where it cannot be exempted: no
// CAP_SYS_RESOURCE) between the engine's OOM kill and the release of the
// engine's memory, before it could report.
func OOMFile(pid string) string {
	cg, err := os.ReadFile("/proc/" + pid + "/cgroup")
	if err != nil {
		return ""
	}
	for _, l := range strings.Split(string(cg), "\n") {
		parts := strings.SplitN(l, ":", 3)
		if len(parts) != 3 {
			continue
		}
		var file string
		switch {
		case parts[0] == "0" && parts[1] == "":
			file = filepath.Join("/sys/fs/cgroup", parts[2], "memory.events")
			if _, err := os.Stat(file); err != nil {
				// Hybrid layout: the v2 tree has no memory controller.
				continue
			}
		case strings.Contains(","+parts[1]+",", ",memory,"):
			file = filepath.Join("/sys/fs/cgroup/memory", parts[2], "memory.oom_control")
		default:
			continue
		}
		if _, err := os.ReadFile(file); err != nil {
			continue
		}
		return file
	}
	return ""
}

// OOMKills reads the counter of an OOMFile (0 if it cannot).
func OOMKills(file string) uint64 {
	if file == "" {
		return 0
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return 0
	}
	for _, kv := range strings.Split(string(b), "\n") {
		if f := strings.Fields(kv); len(f) == 2 && f[0] == "oom_kill" {
			n, _ := strconv.ParseUint(f[1], 10, 64)
			return n
		}
	}
	return 0
}

// closeOnExecFrom marks every descriptor from fd on close-on-exec; the
// shim's own use of them is unchanged.
func closeOnExecFrom(fd int) {
	if unix.CloseRange(uint(fd), ^uint(0), unix.CLOSE_RANGE_CLOEXEC) == nil {
		return
	}
	// Before Linux 5.11.
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return
	}
	for _, e := range ents {
		if n, err := strconv.Atoi(e.Name()); err == nil && n >= fd {
			unix.CloseOnExec(n)
		}
	}
}

// pieceMax is journald's default LineMax=: a longer line is forwarded in
// pieces of at most this, as journald would split it.
const pieceMax = 48 << 10

// forwardLines copies an engine's output stream to w, line by line, a line
// longer than pieceMax in pieces (cut where no UTF-8 sequence is split),
// and gives scan the start of every line. It reads until r ends or fails,
// whatever it is sent and whatever w does, so the engine never blocks on
// its output.
func forwardLines(r io.Reader, w io.Writer, scan func(line []byte)) {
	buf := make([]byte, 2*pieceMax)
	out := make([]byte, 0, pieceMax+1)
	start, end := 0, 0 // unconsumed: buf[start:end]
	lineStart := true
	emit := func(piece []byte, first bool) {
		out = append(append(out[:0], piece...), '\n')
		w.Write(out)
		if first {
			scan(piece)
		}
	}
	for {
		n, err := r.Read(buf[end:])
		end += n
		for {
			data := buf[start:end]
			if i := bytes.IndexByte(data[:min(len(data), pieceMax+1)], '\n'); i >= 0 {
				emit(data[:i], lineStart)
				lineStart = true
				start += i + 1
				continue
			}
			if len(data) > pieceMax {
				n := runeCut(data[:pieceMax])
				emit(data[:n], lineStart)
				lineStart = false
				start += n
				continue
			}
			break
		}
		end = copy(buf, buf[start:end])
		start = 0
		if err != nil {
			if end > 0 {
				emit(buf[:end], lineStart)
			}
			return
		}
	}
}

// runeCut is where to cut b so that no UTF-8 sequence is split, unless
// that would leave nothing.
func runeCut(b []byte) int {
	for i := len(b) - 1; i > 0 && i >= len(b)-utf8.UTFMax; i-- {
		if utf8.RuneStart(b[i]) {
			if utf8.FullRune(b[i:]) {
				return len(b)
			}
			return i
		}
	}
	return len(b)
}
