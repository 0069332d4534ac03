// Package users gives the engine of each pool without User= a user of its
// own: a uid (and a gid of the same number) from EngineUIDs=, allocated per
// pool and kept for it in a record under the state directory, so that one
// compromised engine cannot signal, trace or read another pool's engine or
// cache. The daemon cannot write /etc/passwd (the unit's ProtectSystem=),
// and a transient scope cannot have DynamicUser=; the uids have no name in
// the user database, so the engine is told one in USER and LOGNAME.
//
// A uid is never given out while it is in the user or group database, in a
// subordinate id range (/etc/subuid, /etc/subgid), used by a process, or the
// owner of an entry of the cache directory: so neither a host account nor
// another pool's files or processes ever come with it.
package users

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/llorch/pool-managerd/internal/model"
)

// File is the record's name in the state directory.
const File = "engine-users.json"

// NamePrefix starts the name an engine with a user of its own is told
// (USER, LOGNAME): NamePrefix + the pool's id, as its scope is named.
const NamePrefix = "pool-engine-"

// Record is one pool's entry in the record file.
type Record struct {
	UID uint32 `json:"uid"`
	// Removed is when the pool left the configuration (zero: it is in
	// it). Its uid stays its own, so the pool finds its cache again if it
	// comes back; only when the range runs out is it given to another
	// pool, and then only once nothing on the host holds it.
	Removed time.Time `json:"removed,omitzero"`
}

type file struct {
	Pools map[string]Record `json:"pools"`
}

// Table is the daemon's record of the pools' uids. Its methods are safe
// for concurrent use; one daemon writes the file.
type Table struct {
	path     string
	cacheDir string
	first    uint32
	last     uint32
	group    string

	mu     sync.Mutex
	loaded bool
	pools  map[string]Record
	// What the user and group databases said last, and when: NSS may ask
	// systemd itself (nss-systemd), and pools starting together would ask
	// it for each while it makes their scopes.
	groupGID  uint32
	groupAt   time.Time
	checkedAt map[string]time.Time

	// Probes of the host, replaced by tests.
	inPasswd func(uid uint32) bool
	inGroups func(gid uint32) bool
	now      func() time.Time
	proc     string
	etc      string
}

// Open returns the table kept in path (StateDir/File), for
// uids first to last; cacheDir is CacheDir (its entries' owners are never
// given out), group the engines' supplementary group (pool-engine).
// Nothing is read until a pool asks.
func Open(path, cacheDir string, first, last uint32, group string) *Table {
	return &Table{
		path: path, cacheDir: cacheDir, first: first, last: last, group: group,
		inPasswd: func(uid uint32) bool { _, err := user.LookupId(strconv.FormatUint(uint64(uid), 10)); return err == nil },
		inGroups: func(gid uint32) bool {
			_, err := user.LookupGroupId(strconv.FormatUint(uint64(gid), 10))
			return err == nil
		},
		now:  time.Now,
		proc: "/proc",
		etc:  "/etc",
	}
}

// For returns the account of pool's engine: its recorded uid, else the uid
// its cache directory was given (a lost record), else a free one, which is
// recorded before it is returned. A recorded uid that the user or group
// database now names, or that left EngineUIDs=, is not used again: the
// pool gets another.
func (t *Table) For(pool string) (model.User, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if err := t.load(); err != nil {
		return model.User{}, err
	}
	var extra []uint32
	if g := t.group; g != "" {
		if t.now().Sub(t.groupAt) >= lookupTTL {
			gr, err := user.LookupGroup(g)
			if err != nil {
				return model.User{}, fmt.Errorf("the engines' group %s: %w (the package's sysusers.d file makes it)", g, err)
			}
			n, err := strconv.ParseUint(gr.Gid, 10, 32)
			if err != nil {
				return model.User{}, fmt.Errorf("the engines' group %s has a non-numeric gid %q", g, gr.Gid)
			}
			t.groupGID, t.groupAt = uint32(n), t.now()
		}
		extra = []uint32{t.groupGID}
	}
	account := func(uid uint32) model.User {
		t.checkedAt[pool] = t.now()
		return model.User{Name: NamePrefix + pool, UID: uid, GID: uid, Groups: extra}
	}
	rec, ok := t.pools[pool]
	if ok && rec.Removed.IsZero() && t.now().Sub(t.checkedAt[pool]) < lookupTTL {
		return account(rec.UID), nil
	}
	if ok && t.usable(rec.UID) {
		if !rec.Removed.IsZero() {
			rec.Removed = time.Time{}
			if err := t.put(pool, rec); err != nil {
				return model.User{}, err
			}
		}
		return account(rec.UID), nil
	}
	uid, err := t.allocate(pool)
	if err != nil {
		return model.User{}, err
	}
	if err := t.put(pool, Record{UID: uid}); err != nil {
		return model.User{}, err
	}
	return account(uid), nil
}

// lookupTTL bounds how long a change of the user or group database may go
// unseen by the next start.
const lookupTTL = 2 * time.Second

// Retire marks pool as gone from the configuration; its uid stays
// recorded for it.
func (t *Table) Retire(pool string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if err := t.load(); err != nil {
		return err
	}
	rec, ok := t.pools[pool]
	if !ok || !rec.Removed.IsZero() {
		return nil
	}
	rec.Removed = t.now()
	return t.put(pool, rec)
}

// Records returns a copy of the table, for status and tests.
func (t *Table) Records() (map[string]Record, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if err := t.load(); err != nil {
		return nil, err
	}
	out := make(map[string]Record, len(t.pools))
	for k, v := range t.pools {
		out[k] = v
	}
	return out, nil
}

// usable says whether a recorded uid may still be used: within the range
// and named by neither database.
func (t *Table) usable(uid uint32) bool {
	return uid >= t.first && uid <= t.last && !t.inPasswd(uid) && !t.inGroups(uid)
}

// allocate finds pool a uid: its cache directory's owner if that is one of
// ours and no other pool's, else the lowest free one, else (the range run
// out) the uid of the pool removed longest ago that nothing holds.
func (t *Table) allocate(pool string) (uint32, error) {
	recorded := map[uint32]string{}
	for id, r := range t.pools {
		if id != pool {
			recorded[r.UID] = id
		}
	}
	owners, err := t.cacheOwners()
	if err != nil {
		return 0, err
	}
	if uid, ok := owners[pool]; ok && recorded[uid] == "" && t.usable(uid) {
		return uid, nil
	}
	held := map[uint32]bool{}
	for _, uid := range owners {
		held[uid] = true
	}
	running, err := t.processUIDs()
	if err != nil {
		return 0, err
	}
	sub := t.subordinate()
	free := func(uid uint32) bool {
		return !held[uid] && !running[uid] && !sub(uid) && t.usable(uid)
	}
	for uid := t.first; ; uid++ {
		if _, taken := recorded[uid]; !taken && free(uid) {
			return uid, nil
		}
		if uid == t.last {
			break
		}
	}
	var gone []string
	for id, r := range t.pools {
		if id != pool && !r.Removed.IsZero() && free(r.UID) {
			gone = append(gone, id)
		}
	}
	if len(gone) == 0 {
		return 0, fmt.Errorf("no free uid for pool %s in EngineUIDs=%d-%d: %d are recorded for pools, the others are taken by the user database, processes or files; widen the range",
			pool, t.first, t.last, len(t.pools))
	}
	sort.Slice(gone, func(i, j int) bool { return t.pools[gone[i]].Removed.Before(t.pools[gone[j]].Removed) })
	uid := t.pools[gone[0]].UID
	delete(t.pools, gone[0])
	return uid, nil
}

// cacheOwners maps the entries of the cache directory (a pool's id) to
// their owners, where within the range.
func (t *Table) cacheOwners() (map[string]uint32, error) {
	out := map[string]uint32{}
	if t.cacheDir == "" {
		return out, nil
	}
	d, err := os.Open(t.cacheDir)
	if errors.Is(err, os.ErrNotExist) {
		return out, nil
	}
	if err != nil {
		return nil, fmt.Errorf("engine users: %w", err)
	}
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		return nil, fmt.Errorf("engine users: reading %s: %w", t.cacheDir, err)
	}
	for _, n := range names {
		var st unix.Stat_t
		if unix.Fstatat(int(d.Fd()), n, &st, unix.AT_SYMLINK_NOFOLLOW) == nil && st.Uid >= t.first && st.Uid <= t.last {
			out[n] = st.Uid
		}
	}
	return out, nil
}

// processUIDs are the uids any process runs with (real, effective, saved
// or file system).
func (t *Table) processUIDs() (map[uint32]bool, error) {
	ents, err := os.ReadDir(t.proc)
	if err != nil {
		return nil, fmt.Errorf("engine users: listing processes: %w", err)
	}
	out := map[uint32]bool{}
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join(t.proc, e.Name(), "status"))
		if err != nil {
			continue // gone
		}
		for _, line := range strings.Split(string(b), "\n") {
			if f, ok := strings.CutPrefix(line, "Uid:"); ok {
				for _, s := range strings.Fields(f) {
					if n, err := strconv.ParseUint(s, 10, 32); err == nil {
						out[uint32(n)] = true
					}
				}
				break
			}
		}
	}
	return out, nil
}

// subordinate says whether a uid lies in a range of /etc/subuid or
// /etc/subgid (user namespaces of host users map to them).
func (t *Table) subordinate() func(uint32) bool {
	type span struct{ first, last uint64 }
	var spans []span
	for _, f := range []string{"subuid", "subgid"} {
		b, err := os.ReadFile(filepath.Join(t.etc, f))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			p := strings.Split(strings.TrimSpace(line), ":")
			if len(p) != 3 {
				continue
			}
			start, err1 := strconv.ParseUint(p[1], 10, 32)
			count, err2 := strconv.ParseUint(p[2], 10, 32)
			if err1 == nil && err2 == nil && count > 0 {
				spans = append(spans, span{start, start + count - 1})
			}
		}
	}
	return func(uid uint32) bool {
		return slices.ContainsFunc(spans, func(s span) bool { return uint64(uid) >= s.first && uint64(uid) <= s.last })
	}
}

// load reads the record file once. One that does not parse, or records
// two pools with one uid, is set aside: the pools find their uids again by
// their cache directories' owners.
func (t *Table) load() error {
	if t.loaded {
		return nil
	}
	t.pools = map[string]Record{}
	t.checkedAt = map[string]time.Time{}
	b, err := os.ReadFile(t.path)
	if errors.Is(err, os.ErrNotExist) {
		t.loaded = true
		return nil
	}
	if err != nil {
		return fmt.Errorf("engine users: %w", err)
	}
	var f file
	err = json.Unmarshal(b, &f)
	if err == nil {
		err = check(f)
	}
	if err != nil {
		aside := fmt.Sprintf("%s.corrupt-%s", t.path, t.now().UTC().Format("20060102T150405Z"))
		if rerr := os.Rename(t.path, aside); rerr != nil {
			return fmt.Errorf("engine users: %s: %v, and it cannot be set aside: %w", t.path, err, rerr)
		}
	} else {
		t.pools = f.Pools
	}
	t.loaded = true
	return nil
}

func check(f file) error {
	if f.Pools == nil {
		return errors.New("no pools")
	}
	seen := map[uint32]string{}
	for id, r := range f.Pools {
		if id == "" || strings.ContainsAny(id, "/\x00") {
			return fmt.Errorf("bad pool id %q", id)
		}
		if prev, dup := seen[r.UID]; dup {
			return fmt.Errorf("uid %d recorded for pools %s and %s", r.UID, prev, id)
		}
		seen[r.UID] = id
	}
	return nil
}

// put records pool's entry and writes the file: a new file synced and
// renamed over the old one, so a crash leaves one or the other.
func (t *Table) put(pool string, r Record) error {
	next := make(map[string]Record, len(t.pools)+1)
	for k, v := range t.pools {
		next[k] = v
	}
	next[pool] = r
	b, err := json.MarshalIndent(file{Pools: next}, "", "  ")
	if err != nil {
		return err
	}
	dir := filepath.Dir(t.path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("engine users: %w", err)
	}
	tmp, err := os.CreateTemp(dir, filepath.Base(t.path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("engine users: %w", err)
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.Write(append(b, '\n'))
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), t.path)
	}
	if err != nil {
		return fmt.Errorf("engine users: writing %s: %w", t.path, err)
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	t.pools = next
	return nil
}
