package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
)

// Point is what was counted at rest after Faults faults: goroutines by
// stack, open fds by kind, or a single figure such as RSS.
type Point struct {
	Faults int
	Counts map[string]float64
}

// Rise is a count that grew across a window of points.
type Rise struct {
	Key         string
	First, Last float64
	// Fitted is how far the least-squares line through the points rises
	// from the first point to the last.
	Fitted float64
}

// Rising returns the counts that grow across points, most first: those
// whose least-squares line rises by at least minRise over the window and
// whose last count is above the first. A line fitted to equally spaced
// points that only wander within a band of width w rises by less than
// 1.5 w, however many points there are; so minRise = 3 never takes a count
// that varies by ±1 for a leak, and a count growing by one every 100 faults
// rises by 5 over 500 faults.
func Rising(points []Point, minRise float64) ([]Rise, error) {
	if len(points) < 2 {
		return nil, fmt.Errorf("leak: %d points, need at least 2", len(points))
	}
	for i := 1; i < len(points); i++ {
		if points[i].Faults <= points[i-1].Faults {
			return nil, fmt.Errorf("leak: point %d at %d faults is not after %d", i, points[i].Faults, points[i-1].Faults)
		}
	}
	keys := map[string]bool{}
	for _, p := range points {
		for k := range p.Counts {
			keys[k] = true
		}
	}
	var rises []Rise
	for k := range keys {
		r := fit(points, k)
		if r.Fitted >= minRise && r.Last > r.First {
			rises = append(rises, r)
		}
	}
	sortRises(rises)
	return rises, nil
}

// Steepest is the count of points whose fitted line rises most, leak or
// not: what the soak reports when nothing grows.
func Steepest(points []Point) (Rise, bool) {
	var best Rise
	found := false
	for _, p := range points {
		for k := range p.Counts {
			if r := fit(points, k); !found || r.Fitted > best.Fitted || (r.Fitted == best.Fitted && r.Key < best.Key) {
				best, found = r, true
			}
		}
	}
	return best, found
}

func fit(points []Point, key string) Rise {
	n := float64(len(points))
	var mx, my float64
	for _, p := range points {
		mx += float64(p.Faults)
		my += p.Counts[key]
	}
	mx, my = mx/n, my/n
	var sxy, sxx float64
	for _, p := range points {
		dx := float64(p.Faults) - mx
		sxy += dx * (p.Counts[key] - my)
		sxx += dx * dx
	}
	span := float64(points[len(points)-1].Faults - points[0].Faults)
	return Rise{Key: key, First: points[0].Counts[key], Last: points[len(points)-1].Counts[key], Fitted: sxy / sxx * span}
}

func sortRises(r []Rise) {
	sort.Slice(r, func(i, j int) bool {
		if r[i].Fitted != r[j].Fitted {
			return r[i].Fitted > r[j].Fitted
		}
		return r[i].Key < r[j].Key
	})
}

// Least is the count of each key in every one of samples taken in a row:
// what is left once goroutines and sockets of a probe that happened to be
// in flight are gone. A leak is in every sample.
func Least(samples []map[string]float64) map[string]float64 {
	least := map[string]float64{}
	if len(samples) == 0 {
		return least
	}
	for k, v := range samples[0] {
		least[k] = v
	}
	for _, s := range samples[1:] {
		for k, v := range least {
			if s[k] < v {
				least[k] = s[k]
			}
		}
	}
	for k, v := range least {
		if v == 0 {
			delete(least, k)
		}
	}
	return least
}

// Goroutines groups a goroutine dump (runtime/pprof's goroutine profile
// at debug=2) by what each goroutine is: the function it runs, a newline,
// and "created by" the function that started it. Where it waits is left
// out of the group, so a prober in the middle of a probe is the same
// goroutine as one between probes; where gives, for each group, the stack
// most of its goroutines are at (functions only, without lines, offsets
// or arguments), for the report.
func Goroutines(dump []byte) (counts map[string]float64, where map[string]string, err error) {
	counts, where = map[string]float64{}, map[string]string{}
	stacks := map[string]map[string]int{}
	var frames []string
	in := false
	flush := func() {
		if !in {
			return
		}
		in = false
		if len(frames) == 0 {
			return
		}
		id := frames[len(frames)-1]
		if strings.HasPrefix(id, "created by ") && len(frames) > 1 {
			id = frames[len(frames)-2] + "\n" + id
		}
		counts[id]++
		if stacks[id] == nil {
			stacks[id] = map[string]int{}
		}
		stacks[id][strings.Join(frames, "\n")]++
		frames = frames[:0]
	}
	sc := bufio.NewScanner(bytes.NewReader(dump))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "goroutine ") && strings.HasSuffix(line, ":"):
			flush()
			in = true
		case line == "" || strings.HasPrefix(line, "\t"):
		case !in:
			return nil, nil, fmt.Errorf("leak: %q is outside any goroutine: not a goroutine dump at debug=2", line)
		case strings.HasPrefix(line, "created by "):
			fn, _, _ := strings.Cut(strings.TrimPrefix(line, "created by "), " in goroutine ")
			frames = append(frames, "created by "+fn)
		case strings.HasPrefix(line, "..."):
			frames = append(frames, "...")
		default:
			if i := strings.LastIndexByte(line, '('); i > 0 && strings.HasSuffix(line, ")") {
				line = line[:i]
			}
			frames = append(frames, line)
		}
	}
	flush()
	if err := sc.Err(); err != nil {
		return nil, nil, fmt.Errorf("leak: reading a goroutine dump: %w", err)
	}
	if len(counts) == 0 {
		return nil, nil, errors.New("leak: no goroutine in the dump")
	}
	for id, ss := range stacks {
		best := 0
		for s, n := range ss {
			if n > best || (n == best && s < where[id]) {
				where[id], best = s, n
			}
		}
	}
	return counts, where, nil
}

// Short names a group of goroutines on one line.
func Short(id string) string {
	fn, created, ok := strings.Cut(id, "\n")
	if !ok {
		return fn
	}
	return fn + " (" + created + ")"
}

var digits = regexp.MustCompile(`[0-9]+`)

// FDs groups the open file descriptors of process pid by what they are:
// a socket by protocol (unix, tcp, tcp6, udp, netlink...), a pipe, an
// anonymous inode by its kind, a file by its path with numbers as N (so
// /proc/<pid>/stat of every engine is one kind).
func FDs(pid int) (map[string]float64, error) {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("leak: %w", err)
	}
	protos := socketProtocols(pid)
	kinds := map[string]float64{}
	for _, e := range ents {
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue // closed meanwhile
		}
		kinds[FDKind(target, protos)]++
	}
	return kinds, nil
}

// FDKind is the kind of an fd whose /proc/PID/fd link reads target;
// protos maps socket inodes to their protocol.
func FDKind(target string, protos map[string]string) string {
	switch {
	case strings.HasPrefix(target, "socket:["):
		inode := strings.TrimSuffix(strings.TrimPrefix(target, "socket:["), "]")
		if p, ok := protos[inode]; ok {
			return "socket:" + p
		}
		return "socket"
	case strings.HasPrefix(target, "pipe:["):
		return "pipe"
	case strings.HasPrefix(target, "anon_inode:"):
		return target
	default:
		return digits.ReplaceAllString(target, "N")
	}
}

// socketProtocols maps the inode of every socket in pid's network
// namespace to its protocol, from /proc/PID/net.
func socketProtocols(pid int) map[string]string {
	protos := map[string]string{}
	// The column that holds the inode in each table.
	for proto, col := range map[string]int{"tcp": 9, "tcp6": 9, "udp": 9, "udp6": 9, "raw": 9, "raw6": 9, "unix": 6, "netlink": 9, "packet": 8} {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/%s", pid, proto))
		if err != nil {
			continue
		}
		for i, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			if i == 0 || len(f) <= col {
				continue
			}
			protos[f[col]] = proto
		}
	}
	return protos
}
