package gpu

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"
)

// Holder is a process that holds a GPU: runs compute work on it or has
// its device node open.
type Holder struct {
	PID     int
	Command string // /proc/PID/comm, or the first argument; bounded and printable
	Unit    string // the systemd unit of its cgroup (e.g. "pool-engine-x.scope"), "" if unknown
}

func (h Holder) String() string {
	s := fmt.Sprintf("PID %d", h.PID)
	if h.Command != "" {
		s += " (" + h.Command + ")"
	}
	if h.Unit != "" {
		s += " in " + h.Unit
	}
	return s
}

// maxCommand bounds Holder.Command: it goes into LastError and the journal.
const maxCommand = 64

// ComputeProcesses lists the processes NVML reports running compute work
// on the GPU or MIG device uuid (for a MIG device only that instance's),
// by PID, with Command and Unit read from procRoot ("/proc"). Init and
// Shutdown are its own; a nil n is the host's NVML.
func ComputeProcesses(n NVML, uuid, procRoot string) ([]Holder, error) {
	if n == nil {
		n = NewNVML()
	}
	if err := n.Init(); err != nil {
		return nil, err
	}
	defer n.Shutdown()
	d, err := n.DeviceByUUID(uuid)
	if err != nil {
		return nil, fmt.Errorf("compute processes on %s: %w", uuid, err)
	}
	ps, err := deviceProcesses(d)
	if err != nil {
		return nil, fmt.Errorf("compute processes on %s: %w", uuid, err)
	}
	out := make([]Holder, 0, len(ps))
	for _, p := range ps {
		out = append(out, holder(procRoot, p.PID))
	}
	return out, nil
}

// deviceProcesses are the processes on d, each once, by PID (for a MIG
// device only its instance's), with the memory they use summed over
// their contexts.
func deviceProcesses(d Device) ([]GPUProcess, error) {
	ps, err := d.ComputeProcesses()
	if err != nil {
		return nil, err
	}
	// NVML answers a MIG handle with its own processes; the instance ids
	// guard against a driver that answers with the whole GPU's.
	mig, gi, ci := false, 0, 0
	if p, err := d.Parent(); err != nil {
		return nil, err
	} else if p != nil {
		mig = true
		if gi, ci, err = d.MIGInstance(); err != nil {
			return nil, err
		}
	}
	var out []GPUProcess
	for _, p := range ps {
		if mig && p.GPUInstance != NoInstance && (int(p.GPUInstance) != gi || p.ComputeInstance != NoInstance && int(p.ComputeInstance) != ci) {
			continue
		}
		if p.PID <= 0 {
			continue
		}
		if i := slices.IndexFunc(out, func(o GPUProcess) bool { return o.PID == p.PID }); i >= 0 {
			out[i].UsedMemory += p.UsedMemory
			continue
		}
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b GPUProcess) int { return a.PID - b.PID })
	return out, nil
}

// NodeHolders lists, by PID, the processes that have any of nodes open,
// found by reading the links in procRoot/*/fd; the calling process is
// never one. A process exiting meanwhile is skipped; when no holder is
// found but some process could not be looked into (another user's), the
// error is an *UncheckedError counting them; an unreadable procRoot is
// an error. Pass a GPU's own nodes (/dev/nvidiaN), not the control nodes
// every CUDA process holds.
func NodeHolders(procRoot string, nodes []string) ([]Holder, error) {
	if len(wanted(nodes)) == 0 {
		return nil, nil
	}
	o, err := (&NodeScanner{ProcRoot: procRoot}).Scan()
	if err != nil {
		return nil, fmt.Errorf("processes holding %s: %w", strings.Join(nodes, ", "), err)
	}
	hs := o.Holders(nodes)
	if len(hs) == 0 && o.unchecked > 0 {
		return nil, &UncheckedError{N: o.unchecked}
	}
	return hs, nil
}

// NodeScanner shares scans of ProcRoot among callers that ask at about
// the same time (64 pools restarting at once would scan it 64 times): a
// caller gets a scan that began after it asked, or at most Fresh before
// (a node opened in between is missed as one opened just after a scan
// is); callers that ask while a scan runs share the next one.
type NodeScanner struct {
	ProcRoot string
	Fresh    time.Duration
	mu       sync.Mutex
	next     *nodeScan // not begun yet: who asks now gets it
	last     *nodeScan // the last one begun
	running  sync.Mutex
	// scanned, in tests, runs after each scan, before its callers hear.
	scanned func()
}

type nodeScan struct {
	begun time.Time
	done  chan struct{}
	opens *NodeOpens
	err   error
}

// ProcScanner is the scanner of this host's /proc.
var ProcScanner = &NodeScanner{ProcRoot: "/proc", Fresh: 20 * time.Millisecond}

// NodeOpens is what one scan found: the device nodes each process had
// open.
type NodeOpens struct {
	procRoot string
	// nodes: PID -> the paths its fds point at.
	nodes map[int][]string
	// unchecked: processes whose fds could not be read (another user's,
	// without CAP_SYS_PTRACE); they may hold any node.
	unchecked int
}

// Unchecked counts the processes whose open files the scan could not
// read: a scan that found no holder did not look at them.
func (o *NodeOpens) Unchecked() int { return o.unchecked }

// UncheckedError is a scan that found no holder but could not look at
// every process.
type UncheckedError struct {
	N int
}

func (e *UncheckedError) Error() string {
	return fmt.Sprintf("could not check %d processes of other users for the GPU's device nodes (their /proc/PID/fd is not readable without CAP_SYS_PTRACE)", e.N)
}

// Scan returns the device nodes open in every process (but this one), as
// a scan that began after the call found them.
func (s *NodeScanner) Scan() (*NodeOpens, error) {
	s.mu.Lock()
	if l := s.last; l != nil && s.Fresh > 0 && time.Since(l.begun) <= s.Fresh {
		s.mu.Unlock()
		<-l.done
		return l.opens, l.err
	}
	sc := s.next
	if sc == nil {
		sc = &nodeScan{done: make(chan struct{})}
		s.next = sc
		go s.run(sc)
	}
	s.mu.Unlock()
	<-sc.done
	return sc.opens, sc.err
}

func (s *NodeScanner) run(sc *nodeScan) {
	s.running.Lock()
	defer s.running.Unlock()
	// From now on a caller needs a scan that begins after this one.
	s.mu.Lock()
	if s.next == sc {
		s.next = nil
	}
	sc.begun, s.last = time.Now(), sc
	s.mu.Unlock()
	sc.opens, sc.err = scanNodes(s.ProcRoot)
	if s.scanned != nil {
		s.scanned()
	}
	close(sc.done)
}

func scanNodes(procRoot string) (*NodeOpens, error) {
	entries, err := os.ReadDir(procRoot)
	if err != nil {
		return nil, err
	}
	self := os.Getpid()
	o := &NodeOpens{procRoot: procRoot, nodes: map[int][]string{}}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid <= 0 || pid == self {
			continue
		}
		devs, err := openNodes(filepath.Join(procRoot, e.Name(), "fd"))
		if errors.Is(err, fs.ErrPermission) {
			o.unchecked++
		}
		if len(devs) > 0 {
			o.nodes[pid] = devs
		}
	}
	return o, nil
}

// openNodes lists the paths that fdDir's links point at, each once
// (sockets, pipes, terminals and /dev/null aside: no GPU is one). An
// fdDir or link this process may not read is an fs.ErrPermission (root
// without CAP_SYS_PTRACE lists another user's fds but cannot read where
// they point); a process gone meanwhile is fs.ErrNotExist or no fds.
func openNodes(fdDir string) ([]string, error) {
	fds, err := os.ReadDir(fdDir)
	if err != nil {
		return nil, err
	}
	var out []string
	var denied error
	for _, fd := range fds {
		target, err := os.Readlink(filepath.Join(fdDir, fd.Name()))
		if errors.Is(err, fs.ErrPermission) {
			denied = err
			continue
		}
		if err != nil || !strings.HasPrefix(target, "/") || strings.HasPrefix(target, "/dev/pts/") ||
			target == "/dev/null" || slices.Contains(out, target) {
			continue
		}
		out = append(out, target)
	}
	return out, denied
}

// wanted is nodes as their links may read: as given and resolved.
func wanted(nodes []string) map[string]bool {
	want := map[string]bool{}
	for _, n := range nodes {
		if n == "" {
			continue
		}
		want[filepath.Clean(n)] = true
		if r, err := filepath.EvalSymlinks(n); err == nil {
			want[r] = true
		}
	}
	return want
}

// Holders lists, by PID, the processes the scan found with any of nodes
// open.
func (o *NodeOpens) Holders(nodes []string) []Holder {
	want := wanted(nodes)
	var out []Holder
	for pid, devs := range o.nodes {
		if slices.ContainsFunc(devs, func(d string) bool { return want[d] }) {
			out = append(out, holder(o.procRoot, pid))
		}
	}
	slices.SortFunc(out, func(a, b Holder) int { return a.PID - b.PID })
	return out
}

// holder reads what procRoot says of pid; a process that is gone keeps
// its PID and nothing else.
func holder(procRoot string, pid int) Holder {
	dir := filepath.Join(procRoot, strconv.Itoa(pid))
	h := Holder{PID: pid, Command: command(dir)}
	if b, err := readSmall(filepath.Join(dir, "cgroup")); err == nil {
		h.Unit = cgroupUnit(b)
	}
	return h
}

func command(dir string) string {
	if b, err := readSmall(filepath.Join(dir, "comm")); err == nil {
		if c := printable(string(bytes.TrimRight(b, "\n"))); c != "" {
			return c
		}
	}
	if b, err := readSmall(filepath.Join(dir, "cmdline")); err == nil {
		arg0, _, _ := bytes.Cut(b, []byte{0})
		return printable(filepath.Base(string(arg0)))
	}
	return ""
}

// readSmall reads at most 64 KiB: /proc files are small, a fake one need not be.
func readSmall(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, 64<<10))
}

// printable makes s safe for a journal field and a D-Bus string: control
// and invalid characters become '?', and it is cut to maxCommand runes.
func printable(s string) string {
	var b strings.Builder
	n := 0
	for _, r := range s {
		if n == maxCommand {
			break
		}
		if r == unicode.ReplacementChar || !unicode.IsPrint(r) {
			r = '?'
		}
		b.WriteRune(r)
		n++
	}
	return strings.TrimSpace(b.String())
}

// cgroupUnit is the systemd unit in a /proc/PID/cgroup: the last element
// ending in .scope or .service of the unified (cgroup v2, "0::") path,
// or, where that names none (hybrid hosts), of the name=systemd one.
func cgroupUnit(b []byte) string {
	var unified, named string
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		switch {
		case parts[0] == "0" && parts[1] == "":
			unified = unitIn(parts[2])
		case parts[1] == "name=systemd":
			named = unitIn(parts[2])
		}
	}
	if unified != "" {
		return unified
	}
	return named
}

func unitIn(path string) string {
	elems := strings.Split(path, "/")
	for i := len(elems) - 1; i >= 0; i-- {
		if e := elems[i]; strings.HasSuffix(e, ".scope") || strings.HasSuffix(e, ".service") {
			return printable(e)
		}
	}
	return ""
}
