package config

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"

	"github.com/llorch/pool-managerd/internal/model"
	"github.com/llorch/pool-managerd/internal/users"
)

// lineIndex is where a file sets each key and opens each section.
type lineIndex struct {
	keys     map[string]int // "Section/Key" -> line of its last setting
	sections map[string]int // section -> line of its first header
	last     int            // the file's last line
}

// indexLines reads unit syntax leniently (a file with a syntax error still
// has lines worth naming).
func indexLines(data []byte) lineIndex {
	ix := lineIndex{keys: map[string]int{}, sections: map[string]int{}}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 64*1024), len(data)+1)
	section, cont := "", false
	for sc.Scan() {
		ix.last++
		l := strings.TrimRight(sc.Text(), "\r")
		t := strings.TrimSpace(l)
		if cont {
			cont = strings.HasSuffix(t, "\\")
			continue
		}
		cont = strings.HasSuffix(t, "\\")
		switch {
		case t == "" || t[0] == '#' || t[0] == ';':
		case t[0] == '[':
			section = strings.TrimSuffix(strings.TrimPrefix(t, "["), "]")
			if _, ok := ix.sections[section]; !ok {
				ix.sections[section] = ix.last
			}
		default:
			if k, _, ok := strings.Cut(t, "="); ok {
				ix.keys[section+"/"+strings.TrimSpace(k)] = ix.last
			}
		}
	}
	if ix.last == 0 {
		ix.last = 1
	}
	return ix
}

// line is where to look for an error about section and key: the key's
// last setting; for a key not set, its section's header; for a section
// not there, the end of the file, where it would go; for the file as a
// whole, its first line.
func (ix lineIndex) line(section, key string) int {
	if n, ok := ix.keys[section+"/"+key]; ok && key != "" {
		return n
	}
	if n, ok := ix.sections[section]; ok && section != "" {
		return n
	}
	if section == "" && key == "" {
		return 1
	}
	return ix.last
}

// withLines gives every error about file that has no line yet the line
// that shows where to change it.
func withLines(errs Errors, file string, data []byte) Errors {
	var ix *lineIndex
	for _, e := range errs {
		if e.Line > 0 || e.File != file {
			continue
		}
		if ix == nil {
			i := indexLines(data)
			ix = &i
		}
		e.Line = ix.line(e.Section, e.Key)
	}
	return errs
}

// KeyLine is the line where file sets [section] key= last, 0 when it does
// not (or cannot be read).
func KeyLine(file, section, key string) int {
	data, err := readTrusted(file)
	if err != nil {
		return 0
	}
	return indexLines(data).keys[section+"/"+key]
}

// keyPlace is the file and line that set a pool's [section] key last: its
// last drop-in that does, else the pool file; the pool file and the line
// of the section (or 0) when none does.
func keyPlace(p *Pool, section, key string) (string, int) {
	for i := len(p.DropIns) - 1; i >= 0; i-- {
		if n := KeyLine(p.DropIns[i], section, key); n > 0 {
			return p.DropIns[i], n
		}
	}
	if n := KeyLine(p.File, section, key); n > 0 {
		return p.File, n
	}
	data, err := readTrusted(p.File)
	if err != nil {
		return p.File, 0
	}
	return p.File, indexLines(data).line(section, key)
}

// syntaxLine finds the line go-systemd stopped at: a section header that
// does not end in ']' alone, or a line inside a section that is neither a
// comment nor Key=value. The file's last line when none is (a file that
// ends inside a continuation).
func syntaxLine(data []byte) int {
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 64*1024), len(data)+1)
	n, cont := 0, false
	for sc.Scan() {
		n++
		t := strings.TrimSpace(strings.TrimRight(sc.Text(), "\r"))
		if cont {
			cont = strings.HasSuffix(t, "\\")
			continue
		}
		cont = strings.HasSuffix(t, "\\")
		switch {
		case len(sc.Text()) > 32*1024:
			return n
		case t == "" || t[0] == '#' || t[0] == ';':
		case t[0] == '[':
			if i := strings.IndexByte(t, ']'); i < 0 || i != len(t)-1 {
				return n
			}
		case !strings.Contains(t, "="):
			return n
		}
	}
	return max(n, 1)
}

// keyHint says where an unknown key of section probably belongs: a key of
// that name in another section, else the closest known key by edit
// distance, in this section first. "" when nothing is close.
func keyHint(s schema, passthrough map[string]func(option), section, key string) string {
	known := map[string][]string{}
	for sec, keys := range s {
		for k := range keys {
			known[sec] = append(known[sec], k)
		}
	}
	if _, ok := passthrough["Scope"]; ok {
		for k := range scopeKeys {
			known["Scope"] = append(known["Scope"], k)
		}
	}
	secs := make([]string, 0, len(known))
	for sec := range known {
		secs = append(secs, sec)
		sort.Strings(known[sec])
	}
	sort.Strings(secs)
	for _, sec := range secs {
		if sec == section {
			continue
		}
		for _, k := range known[sec] {
			if strings.EqualFold(k, key) {
				return fmt.Sprintf(": %s= belongs in [%s]", k, sec)
			}
		}
	}
	if k := closest(key, known[section]); k != "" {
		return fmt.Sprintf(": did you mean %s=?", k)
	}
	for _, sec := range secs {
		if sec == section {
			continue
		}
		if k := closest(key, known[sec]); k != "" {
			return fmt.Sprintf(": did you mean %s= in [%s]?", k, sec)
		}
	}
	return ""
}

// sectionHint is the closest known section to an unknown one.
func sectionHint(s schema, passthrough map[string]func(option), section string) string {
	var names []string
	for n := range s {
		names = append(names, n)
	}
	for n := range passthrough {
		names = append(names, n)
	}
	sort.Strings(names)
	if n := closest(section, names); n != "" {
		return fmt.Sprintf("; did you mean [%s]?", n)
	}
	return ""
}

// closest is the choice nearest to word, ignoring case: one a typo or two
// away (more for long words), or one that word begins or that begins with
// word (at least 4 letters: Timeout for TimeoutSec). "" when none is.
func closest(word string, choices []string) string {
	w := strings.ToLower(word)
	best, bestD := "", 1<<30
	for _, c := range choices {
		lc := strings.ToLower(c)
		d := editDistance(w, lc)
		limit := 1
		switch {
		case len(w) > 8:
			limit = 3
		case len(w) > 4:
			limit = 2
		}
		if d > limit && !(len(w) >= 4 && (strings.HasPrefix(lc, w) || strings.HasPrefix(w, lc))) {
			continue
		}
		if d < bestD {
			best, bestD = c, d
		}
	}
	return best
}

// editDistance counts the insertions, deletions, substitutions and swaps
// of neighbours that turn a into b (optimal string alignment).
func editDistance(a, b string) int {
	ra, rb := []rune(a), []rune(b)
	prev2 := make([]int, len(rb)+1)
	prev := make([]int, len(rb)+1)
	cur := make([]int, len(rb)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(ra); i++ {
		cur[0] = i
		for j := 1; j <= len(rb); j++ {
			cost := 1
			if ra[i-1] == rb[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
			if i > 1 && j > 1 && ra[i-1] == rb[j-2] && ra[i-2] == rb[j-1] {
				cur[j] = min(cur[j], prev2[j-2]+1)
			}
		}
		prev2, prev, cur = prev, cur, prev2
	}
	return prev[len(rb)]
}

// checkPorts finds two pools on one Port=: the second engine could never
// bind it.
func (c *Config) checkPorts() Errors {
	var errs Errors
	owner := map[int]*Pool{}
	for _, p := range c.Pools {
		if p.Engine.Port == 0 {
			continue
		}
		if prev, ok := owner[p.Engine.Port]; ok {
			errs = append(errs, &Error{File: p.File, Section: "Engine", Key: "Port",
				Msg: fmt.Sprintf("%d is already the port of pool %q (%s): each engine needs a port of its own", p.Engine.Port, prev.ID, prev.File)})
			continue
		}
		owner[p.Engine.Port] = p
	}
	return errs
}

// GPUInfo is what the host's inventory says of a Devices= entry.
type GPUInfo struct {
	UUID string
	// Parent is the whole GPU's UUID for a MIG device, "" for a GPU.
	Parent string
}

// Host is what CheckHost asks of the machine: the GPU inventory as the
// daemon will load it (NVML, else the static one).
type Host struct {
	// GPU resolves one Devices= entry; an error says why it is not there.
	GPU func(dev string) (GPUInfo, error)
}

// enginePath is the PATH the engine's command is looked up in (the shim's).
var enginePath = []string{"/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"}

// CheckHost finds what a valid configuration would still fail at on this
// host when its pools start: a GPU that two pools outside one Group= name
// differently (index, UUID, a MIG device and its parent), members of a
// group on other GPUs, a GPU the host lacks, an unknown
// User=, an ExecStart= binary that is missing or that the pool's user may
// not execute, a Model= that is missing or that the user may not read.
// Every error names file and line.
func CheckHost(c *Config, h Host) Errors {
	var errs Errors
	stager := model.New(c.Manager.ModelsDir, filepath.Join(c.Manager.StateDir, "staged"), model.WithModelDirs(c.Manager.ModelDirs...))
	var refs []string
	for _, p := range c.Pools {
		refs = append(refs, p.Model)
	}
	stager.SetPoolModels(refs)

	var shared []*Pool
	known := map[string]GPUInfo{}
	for _, p := range c.Pools {
		fail := func(section, key, format string, a ...any) {
			file, line := keyPlace(p, section, key)
			errs = append(errs, &Error{File: file, Line: line, Section: section, Key: key, Msg: fmt.Sprintf(format, a...)})
		}
		if h.GPU != nil {
			ok := true
			for _, d := range p.Devices {
				g, err := h.GPU(d)
				if err != nil {
					fail("Pool", "Devices", "%v", err)
					ok = false
					continue
				}
				known[d] = g
			}
			if ok {
				shared = append(shared, p)
			}
		}

		// A User= the files name must exist; a pool's own user is made
		// when it first starts.
		u := ownUser(c, p)
		if p.Engine.User != "" {
			var err error
			if u, err = model.LookupUser(p.Engine.User); err != nil {
				fail("Engine", "User", "user %q does not exist on this host (create it, or drop User= for a user of the pool's own)", p.Engine.User)
				// Whoever it will be, the files must be there.
				u = model.User{Name: "root"}
			}
		}

		if len(p.Engine.ExecStart) > 0 {
			bin := p.Specifiers("").Expand(p.Engine.ExecStart[0])
			if msg := executable(bin, u); msg != "" {
				fail("Engine", "ExecStart", "%s", msg)
			}
		}
		if _, err := stager.Resolve(p.Model, u); err != nil {
			fail("Pool", "Model", "%v", err)
		}
	}
	if h.GPU != nil {
		errs = append(errs, CheckSharedGPUs(shared, func(d string) (GPUInfo, bool) { return known[d], true })...)
	}
	return errs
}

// ownUser stands for the user a pool without User= gets when it first
// starts: a uid and group of its own, owning nothing yet, in the engines'
// group.
func ownUser(c *Config, p *Pool) model.User {
	id := c.Manager.EngineUIDs.Last
	u := model.User{Name: users.NamePrefix + p.ID, UID: id, GID: id}
	if g, err := user.LookupGroup(EngineGroup); err == nil {
		if n, err := strconv.ParseUint(g.Gid, 10, 32); err == nil {
			u.Groups = []uint32{uint32(n)}
		}
	}
	return u
}

// executable says why u could not execute bin (looked up in the engine's
// PATH when it has no slash), "" when it could.
func executable(bin string, u model.User) string {
	path := bin
	if !strings.Contains(bin, "/") {
		path = ""
		for _, d := range enginePath {
			if fi, err := os.Stat(filepath.Join(d, bin)); err == nil && fi.Mode().IsRegular() {
				path = filepath.Join(d, bin)
				break
			}
		}
		if path == "" {
			return fmt.Sprintf("%s is not in the engine's PATH (%s): give its absolute path", bin, strings.Join(enginePath, ":"))
		}
	}
	real, err := filepath.EvalSymlinks(path)
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Sprintf("%s does not exist", path)
	}
	if err != nil {
		return fmt.Sprintf("%s: %v", path, err)
	}
	fi, err := os.Stat(real)
	if err != nil {
		return fmt.Sprintf("%s: %v", path, err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Sprintf("%s is not a regular file", path)
	}
	// Every directory on the way must let the user through.
	for d := filepath.Dir(real); ; d = filepath.Dir(d) {
		if st, err := os.Stat(d); err == nil && !may(u, st, 0o1) {
			return fmt.Sprintf("%s: the engine's user %s (uid %d) may not enter %s (%s)", path, u.Name, u.UID, d, modeOf(st))
		}
		if d == "/" {
			break
		}
	}
	if !may(u, fi, 0o1) {
		return fmt.Sprintf("%s is not executable by the engine's user %s (uid %d): %s", path, u.Name, u.UID, modeOf(fi))
	}
	return ""
}

// may says whether u has the permission bits want (rwx as 4, 2, 1) on a
// file, as the kernel decides: the owner's bits for the owner alone, then
// the group's, then the others'; root needs an x bit somewhere to execute.
func may(u model.User, fi os.FileInfo, want uint32) bool {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return true
	}
	mode := uint32(fi.Mode().Perm())
	switch {
	case u.UID == 0:
		return want&0o1 == 0 || fi.IsDir() || mode&0o111 != 0
	case st.Uid == u.UID:
		return mode>>6&want == want
	case st.Gid == u.GID || slices.Contains(u.Groups, st.Gid):
		return mode>>3&want == want
	}
	return mode&want == want
}

func modeOf(fi os.FileInfo) string {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Sprintf("mode %04o", fi.Mode().Perm())
	}
	return fmt.Sprintf("mode %04o, owner %d, group %d", fi.Mode().Perm(), st.Uid, st.Gid)
}

// scopeHint places a key [Scope] does not take: one of another section's,
// or a near miss of a [Scope] key.
func scopeHint(s schema, key string) string {
	if _, owned := ownedScopeKeys[key]; owned {
		return ""
	}
	if _, ok := scopeKeys[key]; ok {
		return ""
	}
	return keyHint(s, map[string]func(option){"Scope": nil}, "Scope", key)
}

// lastSet places e at the last line that sets its key, in the pool file or
// a drop-in; e as it is when none does (withLines places it later).
func lastSet(opts []option, e *Error) *Error {
	if e.Key == "" {
		return e
	}
	for i := len(opts) - 1; i >= 0; i-- {
		if o := opts[i]; o.section == e.Section && o.key == e.Key && o.line > 0 {
			if o.file != "" {
				e.File = o.file
			}
			e.Line = o.line
			return e
		}
	}
	return e
}
