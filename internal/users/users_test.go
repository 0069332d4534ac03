package users

import (
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// newTable is a table in a test's directory, over uids first to last, with
// no supplementary group and no subordinate ids.
func newTable(t *testing.T, first, last uint32) (*Table, string) {
	t.Helper()
	dir := t.TempDir()
	tb := Open(filepath.Join(dir, "state", File), filepath.Join(dir, "cache"), first, last, "")
	tb.etc = dir
	return tb, dir
}

func reopen(t *testing.T, tb *Table) *Table {
	t.Helper()
	n := Open(tb.path, tb.cacheDir, tb.first, tb.last, tb.group)
	n.etc = tb.etc
	return n
}

func TestTwoPoolsNeverGetOneUID(t *testing.T) {
	tb, _ := newTable(t, 70000, 70063)
	var wg sync.WaitGroup
	uids := make([]uint32, 64)
	errs := make([]error, 64)
	for i := range uids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			u, err := tb.For(fmt.Sprintf("p%d", i))
			uids[i], errs[i] = u.UID, err
		}()
	}
	wg.Wait()
	seen := map[uint32]int{}
	for i, uid := range uids {
		require.NoError(t, errs[i])
		prev, dup := seen[uid]
		require.False(t, dup, "pools p%d and p%d both got uid %d", prev, i, uid)
		seen[uid] = i
		assert.True(t, uid >= 70000 && uid <= 70063)
	}
	_, err := tb.For("one-too-many")
	require.Error(t, err)
	assert.Contains(t, err.Error(), "no free uid for pool one-too-many in EngineUIDs=70000-70063: 64 are recorded for pools")

	// What was recorded is what a restarted daemon reads.
	again := reopen(t, tb)
	for i, uid := range uids {
		u, err := again.For(fmt.Sprintf("p%d", i))
		require.NoError(t, err)
		assert.Equal(t, uid, u.UID)
	}
}

func TestAccountOfAPoolsOwnUser(t *testing.T) {
	tb, _ := newTable(t, 70000, 70009)
	g, err := user.LookupGroupId("0")
	require.NoError(t, err)
	tb.group = g.Name
	u, err := tb.For("llama")
	require.NoError(t, err)
	assert.Equal(t, "pool-engine-llama", u.Name, "USER and LOGNAME: named as its scope")
	assert.Equal(t, uint32(70000), u.UID)
	assert.Equal(t, u.UID, u.GID, "a group of its own too")
	assert.Equal(t, []uint32{0}, u.Groups, "and the engines' group besides")

	tb = reopen(t, tb)
	tb.group = "no-such-group-pmd"
	_, err = tb.For("llama")
	assert.ErrorContains(t, err, "the engines' group no-such-group-pmd: group: unknown group no-such-group-pmd (the package's sysusers.d file makes it)")
}

// A pool keeps its uid across restarts, and when it leaves the
// configuration and comes back; a retired uid goes to another pool only
// when the range has run out, the one retired longest ago first.
func TestRetiredUIDStaysThePoolsUntilTheRangeRunsOut(t *testing.T) {
	tb, _ := newTable(t, 70000, 70002)
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	tb.now = func() time.Time { return now }
	for _, id := range []string{"a", "b", "c"} {
		_, err := tb.For(id)
		require.NoError(t, err)
	}
	require.NoError(t, tb.Retire("b"))
	now = now.Add(time.Hour)
	require.NoError(t, tb.Retire("a"))
	recs, err := tb.Records()
	require.NoError(t, err)
	assert.Equal(t, now.Add(-time.Hour), recs["b"].Removed)

	tb = reopen(t, tb)
	a, err := tb.For("a")
	require.NoError(t, err)
	assert.Equal(t, uint32(70000), a.UID, "back in the configuration: its own uid again")
	recs, err = tb.Records()
	require.NoError(t, err)
	assert.True(t, recs["a"].Removed.IsZero())

	d, err := tb.For("d")
	require.NoError(t, err)
	assert.Equal(t, uint32(70001), d.UID, "the range is full: b's, retired longest ago")
	recs, err = tb.Records()
	require.NoError(t, err)
	assert.NotContains(t, recs, "b")
	_, err = tb.For("e")
	assert.ErrorContains(t, err, "no free uid for pool e")
}

// A uid the user database names is never given out; a recorded one that
// it names now is given up for another.
func TestUIDInPasswdIsNeverAllocated(t *testing.T) {
	me, err := user.Lookup("pmtest")
	if err != nil {
		me, err = user.Lookup("nobody")
	}
	require.NoError(t, err)
	n, err := strconv.ParseUint(me.Uid, 10, 32)
	require.NoError(t, err)
	named := uint32(n)
	tb, _ := newTable(t, named, named+1)
	u, err := tb.For("a")
	require.NoError(t, err)
	assert.Equal(t, named+1, u.UID, "uid %d is %s's", named, me.Username)

	// A host account made with the pool's recorded uid afterwards.
	tb, _ = newTable(t, named-1, named+1)
	tb.inPasswd = func(uint32) bool { return false }
	u, err = tb.For("a")
	require.NoError(t, err)
	require.NoError(t, tb.put("a", Record{UID: named}))
	tb = reopen(t, tb)
	u, err = tb.For("a")
	require.NoError(t, err)
	assert.NotEqual(t, named, u.UID, "a uid the user database names now is not the pool's any more")
}

// A uid any process runs as is never given out.
func TestUIDInUseIsNeverAllocated(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: runs a process as another uid")
	}
	tb, _ := newTable(t, 70100, 70101)
	cmd := exec.Command("/bin/sleep", "30")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 70100, Gid: 70100}}
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	u, err := tb.For("a")
	require.NoError(t, err)
	assert.Equal(t, uint32(70101), u.UID, "uid 70100 runs sleep (pid %d)", cmd.Process.Pid)
	_, err = tb.For("b")
	assert.ErrorContains(t, err, "no free uid for pool b in EngineUIDs=70100-70101")
}

// Subordinate ids are mapped into user namespaces of host users: never
// given out.
func TestSubordinateUIDsAreNeverAllocated(t *testing.T) {
	tb, dir := newTable(t, 70000, 70010)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "subuid"), []byte("alice:70000:3\nbad line\n"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "subgid"), []byte("alice:70003:1\n"), 0o644))
	u, err := tb.For("a")
	require.NoError(t, err)
	assert.Equal(t, uint32(70004), u.UID)
}

// The owner of a cache directory's entry is never another pool's; a pool
// whose record was lost gets its cache directory's owner back.
func TestCacheDirOwnerIsNeverAnotherPools(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: gives a directory to another uid")
	}
	tb, dir := newTable(t, 70000, 70010)
	cache := filepath.Join(dir, "cache")
	require.NoError(t, os.MkdirAll(filepath.Join(cache, "old"), 0o700))
	require.NoError(t, os.Chown(filepath.Join(cache, "old"), 70000, 70000))
	u, err := tb.For("new")
	require.NoError(t, err)
	assert.Equal(t, uint32(70001), u.UID, "uid 70000 owns the cache of pool old")

	// The record is lost (corrupt): set aside, and old finds its uid by
	// its cache.
	require.NoError(t, os.WriteFile(tb.path, []byte("{not json"), 0o600))
	tb = reopen(t, tb)
	u, err = tb.For("old")
	require.NoError(t, err)
	assert.Equal(t, uint32(70000), u.UID)
	aside, _ := filepath.Glob(tb.path + ".corrupt-*")
	assert.Len(t, aside, 1, "the bad record is kept aside")
}

// A record file naming one uid for two pools is not believed.
func TestRecordWithADuplicateUIDIsSetAside(t *testing.T) {
	tb, _ := newTable(t, 70000, 70010)
	require.NoError(t, os.MkdirAll(filepath.Dir(tb.path), 0o755))
	require.NoError(t, os.WriteFile(tb.path, []byte(`{"pools":{"a":{"uid":70005},"b":{"uid":70005}}}`), 0o600))
	a, err := tb.For("a")
	require.NoError(t, err)
	b, err := tb.For("b")
	require.NoError(t, err)
	assert.NotEqual(t, a.UID, b.UID)
	aside, _ := filepath.Glob(tb.path + ".corrupt-*")
	assert.Len(t, aside, 1)
}

// A recorded uid outside a changed EngineUIDs= is not used any more.
func TestUIDOutsideAChangedRangeIsGivenUp(t *testing.T) {
	tb, _ := newTable(t, 70000, 70010)
	_, err := tb.For("a")
	require.NoError(t, err)
	moved := Open(tb.path, tb.cacheDir, 80000, 80010, "")
	moved.etc = tb.etc
	u, err := moved.For("a")
	require.NoError(t, err)
	assert.Equal(t, uint32(80000), u.UID)
}
