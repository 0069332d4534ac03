package gpu

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"
)

// KernelXID is an XID as the driver writes it to the kernel log:
// "NVRM: Xid (PCI:0000:3b:00): 31, pid=1234, name=python3, ...". Only
// this line names the process whose channel raised it: NVML's event data
// (go-nvml's EventData) carries the device, the XID and the MIG instance,
// not a process.
type KernelXID struct {
	PCI string // domain:bus:device.function, as NVML takes it
	XID uint64
	PID int // 0: the line names no process (pid='<unknown>', or an older driver)
}

// maxPID is the kernel's largest pid_max (PID_MAX_LIMIT on 64-bit).
const maxPID = 1 << 22

// The driver's line begins the kernel's message: a line that only holds
// one further on (an audit record quoting a user's text, a packet log's
// prefix after another) is not the driver's.
var kernelXIDLine = regexp.MustCompile(`^NVRM: Xid \(PCI:([0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2})(?:\.([0-7]))?\): ([0-9]{1,6})(?:, pid=([0-9]{1,8}|'?<unknown>'?))?[,.]`)

// ParseKernelXID reads one kernel message (a journal entry's MESSAGE);
// false if it is no XID line.
func ParseKernelXID(msg string) (KernelXID, bool) {
	m := kernelXIDLine.FindStringSubmatch(msg)
	if m == nil {
		return KernelXID{}, false
	}
	fn := m[2]
	if fn == "" {
		fn = "0"
	}
	xid, err := strconv.ParseUint(m[3], 10, 64)
	if err != nil {
		return KernelXID{}, false
	}
	k := KernelXID{PCI: strings.ToLower(m[1]) + "." + fn, XID: xid}
	if pid, err := strconv.Atoi(m[4]); err == nil && pid > 0 && pid <= maxPID {
		k.PID = pid
	}
	return k, true
}

// Bounds of what is read from journalctl: a line longer than maxJournalLine
// (journalctl prints fields over 4 KiB as null) is skipped, a cursor
// longer than maxCursor is not kept, and at most maxJournalErr bytes of
// what it says on stderr are kept.
const (
	maxJournalLine = 64 << 10
	maxCursor      = 512
	maxJournalErr  = 4 << 10
)

// journalSettle is how long journalctl must run, having printed nothing,
// to count as reading the journal: one that cannot read it exits at once.
var journalSettle = time.Second

// journalArgs follow the kernel's entries of this boot (--dmesg matches
// _TRANSPORT=kernel) as JSON, with the fields the reader checks.
var journalArgs = []string{"--dmesg", "--follow", "--no-pager", "--output=json",
	"--output-fields=MESSAGE,_TRANSPORT,SYSLOG_FACILITY"}

// KernelJournal follows the kernel's entries in the journal for the
// driver's XID lines, with journalctl. journald sets _TRANSPORT=kernel
// only on what it reads from /dev/kmsg, and no client can set a field
// that begins with "_"; a record a process writes to /dev/kmsg (root
// only) is marked kernel too, but never has the kernel's facility (0):
// the kernel gives it the user facility.
type KernelJournal struct {
	// Command runs journalctl (its arguments are added); nil is
	// "journalctl" from PATH.
	Command []string

	cursor string // after the last entry read: a new run goes on from there
}

// journalEntry holds the fields read of one entry. A field the entry
// holds twice is a JSON array, one that is not UTF-8 an array of bytes:
// neither is the kernel's.
type journalEntry struct {
	Message   json.RawMessage `json:"MESSAGE"`
	Transport json.RawMessage `json:"_TRANSPORT"`
	Facility  json.RawMessage `json:"SYSLOG_FACILITY"`
	Cursor    json.RawMessage `json:"__CURSOR"`
}

func jsonString(raw json.RawMessage) (string, bool) {
	var s string
	if len(raw) == 0 || raw[0] != '"' || json.Unmarshal(raw, &s) != nil {
		return "", false
	}
	return s, true
}

// kernelMessage is the MESSAGE of one line of journalctl's JSON output if
// the kernel wrote it, and the entry's cursor.
func kernelMessage(line []byte) (msg, cursor string, ok bool) {
	var e journalEntry
	if json.Unmarshal(line, &e) != nil {
		return "", "", false
	}
	cursor, _ = jsonString(e.Cursor)
	if t, _ := jsonString(e.Transport); t != "kernel" {
		return "", cursor, false
	}
	if f, _ := jsonString(e.Facility); f != "0" {
		return "", cursor, false
	}
	msg, ok = jsonString(e.Message)
	return msg, cursor, ok
}

// read reads journalctl's JSON lines from r until it ends,
// calling seen for each line and fn for each XID line the kernel wrote.
func (j *KernelJournal) read(r io.Reader, seen func(), fn func(KernelXID)) error {
	br := bufio.NewReaderSize(r, maxJournalLine)
	long := false
	for {
		line, err := br.ReadSlice('\n')
		switch {
		case errors.Is(err, bufio.ErrBufferFull):
			long = true
			continue
		case err != nil:
			return err
		case long:
			long = false
			continue
		}
		seen()
		msg, cursor, ok := kernelMessage(line)
		if cursor != "" && len(cursor) <= maxCursor {
			j.cursor = cursor
		}
		if !ok {
			continue
		}
		if k, ok := ParseKernelXID(msg); ok {
			fn(k)
		}
	}
}

// Follow runs journalctl, from now on or after the last entry an earlier
// run read, until ctx ends (then it returns nil) or journalctl exits (an
// error with its status and what it said). readable is called once
// journalctl reads the journal; fn is called for each XID line the kernel
// wrote, in the journal's order.
func (j *KernelJournal) Follow(ctx context.Context, readable func(), fn func(KernelXID)) error {
	argv := j.Command
	if len(argv) == 0 {
		argv = []string{"journalctl"}
	}
	args := append(append(append([]string(nil), argv[1:]...), journalArgs...), "--lines=0")
	if j.cursor != "" {
		args = append(args[:len(args)-1], "--no-tail", "--after-cursor="+j.cursor)
	}
	cmd := exec.CommandContext(ctx, argv[0], args...)
	cmd.Env = append(os.Environ(), "SYSTEMD_COLORS=0", "SYSTEMD_PAGER=")
	stderr := &capped{max: maxJournalErr}
	cmd.Stderr = stderr
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.StdoutPipe()
	if err != nil {
		return fmt.Errorf("journalctl: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("journalctl: %w", err)
	}
	// The settle timer and the lines read both say it is readable: the
	// first that does, before Follow returns.
	var mu sync.Mutex
	said, ended := false, false
	say := func() {
		mu.Lock()
		defer mu.Unlock()
		if !said && !ended {
			said = true
			readable()
		}
	}
	settle := time.AfterFunc(journalSettle, say)
	rerr := j.read(out, say, fn)
	settle.Stop()
	mu.Lock()
	ended = true
	mu.Unlock()
	werr := cmd.Wait()
	if ctx.Err() != nil {
		return nil
	}
	said2 := strings.TrimSpace(stderr.String())
	if i := strings.IndexByte(said2, '\n'); i >= 0 {
		said2 = said2[:i]
	}
	switch {
	case werr != nil && said2 != "":
		return fmt.Errorf("journalctl: %w: %s", werr, said2)
	case werr != nil:
		return fmt.Errorf("journalctl: %w", werr)
	case said2 != "":
		return fmt.Errorf("journalctl ended: %s", said2)
	case rerr != nil && !errors.Is(rerr, io.EOF):
		return fmt.Errorf("journalctl: %w", rerr)
	}
	return errors.New("journalctl ended")
}

// capped keeps the first max bytes written to it.
type capped struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (c *capped) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if room := c.max - len(c.b); room > 0 {
		c.b = append(c.b, p[:min(room, len(p))]...)
	}
	return len(p), nil
}

func (c *capped) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return string(c.b)
}

// CgroupOf is the cgroup v2 path of process pid, from procRoot/PID/cgroup
// ("0::" line); "" with an error if the process is gone or has none.
func CgroupOf(procRoot string, pid int) (string, error) {
	if pid <= 0 {
		return "", fmt.Errorf("pid %d", pid)
	}
	b, err := readSmall(filepath.Join(procRoot, strconv.Itoa(pid), "cgroup"))
	if err != nil {
		return "", err
	}
	for line := range bytes.Lines(b) {
		if p, ok := bytes.CutPrefix(bytes.TrimRight(line, "\n"), []byte("0::")); ok && len(p) > 0 && p[0] == '/' {
			return string(p), nil
		}
	}
	return "", fmt.Errorf("pid %d: no cgroup v2 path", pid)
}

// UUIDByPCI is the UUID of the GPU at PCI bus id busID, as NVML names it.
// Init and Shutdown are its own; a nil n is the host's NVML.
func UUIDByPCI(n NVML, busID string) (string, error) {
	if n == nil {
		n = NewNVML()
	}
	if err := n.Init(); err != nil {
		return "", err
	}
	defer n.Shutdown()
	d, err := n.DeviceByPCI(busID)
	if err != nil {
		return "", err
	}
	return d.UUID()
}
