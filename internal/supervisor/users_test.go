package supervisor_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// cred is a process's credential as /proc/PID/status shows it.
type cred struct {
	uid, gid uint32
	groups   []uint32
}

func procCred(t *testing.T, pid int) cred {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	require.NoError(t, err)
	var c cred
	num := func(s string) uint32 {
		n, err := strconv.ParseUint(s, 10, 32)
		require.NoError(t, err)
		return uint32(n)
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, _ := strings.Cut(line, ":")
		f := strings.Fields(v)
		switch k {
		case "Uid":
			c.uid = num(f[0])
			for _, x := range f[1:] {
				assert.Equal(t, c.uid, num(x), "real, effective, saved and file system uid alike")
			}
		case "Gid":
			c.gid = num(f[0])
		case "Groups":
			for _, x := range f {
				c.groups = append(c.groups, num(x))
			}
		}
	}
	return c
}

// asCred runs a shell command with c's credential, as the engine that has
// it could: its output and error.
func asCred(c cred, script string) (string, error) {
	cmd := exec.Command("/bin/sh", "-c", script)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: c.uid, Gid: c.gid, Groups: c.groups}}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// poolUID is the uid recorded for a pool of its own user.
func poolUID(t *testing.T, e *testpool.Env, id string) string {
	t.Helper()
	recs, err := e.Users.Records()
	require.NoError(t, err)
	r, ok := recs[id]
	require.True(t, ok, "pool %s has no user of its own", id)
	return fmt.Sprint(r.UID)
}

// Without User= each pool's engine runs as a user of its own: one
// compromised engine cannot signal, trace or read another pool's engine,
// nor read its cache.
func TestPoolsRunAsUsersOfTheirOwnAndCannotTouchEachOther(t *testing.T) {
	e := testpool.New(t, nil)
	a := e.Pool("alpha", "0", "", "")
	b := e.Pool("beta", "1", "", "")
	sa := waitFor(t, a, "alpha ready", ready(1))
	sb := waitFor(t, b, "beta ready", ready(1))
	ca, cb := procCred(t, sa.MainPID), procCred(t, sb.MainPID)
	assert.NotEqual(t, ca.uid, cb.uid, "two pools, two users")
	for _, c := range []cred{ca, cb} {
		assert.True(t, c.uid >= 65536 && c.uid <= 99999, "uid %d from EngineUIDs=", c.uid)
		assert.Equal(t, c.uid, c.gid, "a group of its own")
		assert.Equal(t, []uint32{engineGroup(t)}, c.groups, "and pool-engine besides, for shared models")
	}
	assert.Equal(t, fmt.Sprint(ca.uid), poolUID(t, e, "alpha"))
	environ, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", sa.MainPID))
	require.NoError(t, err)
	assert.Contains(t, string(environ), "\x00USER=pool-engine-alpha\x00")
	assert.Contains(t, string(environ), "\x00LOGNAME=pool-engine-alpha\x00")
	cacheB := filepath.Join(e.Dir, "cache", "beta")
	fi, err := os.Stat(cacheB)
	require.NoError(t, err)
	assert.Equal(t, cb.uid, fi.Sys().(*syscall.Stat_t).Uid, "the cache directory is its engine's")

	// The same probes succeed with beta's own credential: what fails
	// below fails for alpha's uid, nothing else.
	out, err := asCred(cb, fmt.Sprintf("kill -0 %d && head -c1 /proc/%d/environ >/dev/null && ls %s >/dev/null && echo ok", sb.MainPID, sb.MainPID, cacheB))
	require.NoError(t, err, out)

	out, err = asCred(ca, fmt.Sprintf("kill -KILL %d", sb.MainPID))
	require.Error(t, err, "alpha's uid may not signal beta's engine")
	assert.Contains(t, out, "Operation not permitted")
	out, err = asCred(ca, fmt.Sprintf("cat /proc/%d/environ", sb.MainPID))
	require.Error(t, err, "nor read what only a tracer may")
	assert.Contains(t, out, "Permission denied")
	out, err = asCred(ca, "ls "+cacheB)
	require.Error(t, err, "nor list its cache")
	assert.Contains(t, out, "Permission denied")

	time.Sleep(200 * time.Millisecond)
	assert.Equal(t, sb.MainPID, b.Snapshot().MainPID, "beta's engine lives on")
	assert.Zero(t, b.Snapshot().Policy.CrashCount)
}

// A pool keeps its uid across a daemon restart: the adopted engine is
// the pool's, and its next engine runs as the same uid.
func TestPoolsUIDIsStableAcrossADaemonRestart(t *testing.T) {
	e := testpool.New(t, nil)
	s := e.Pool("steady", "0", "", "")
	first := waitFor(t, s, "ready", ready(1))
	uid := procCred(t, first.MainPID).uid

	// A second supervisor of the pool, with the table read again from
	// the state directory, as after a daemon restart.
	e.Users = nil
	again := e.Start(testpool.Spec{ID: "steady", Devices: "0", NoStart: true, Port: s.Port})
	ctx, cancel := context.WithTimeout(e.Ctx, 30*time.Second)
	defer cancel()
	adopted, err := again.Adopt(ctx, func(string) bool { return true })
	require.NoError(t, err)
	require.True(t, adopted)
	require.NoError(t, again.Stop(ctx))
	require.NoError(t, again.Start())
	snap := waitFor(t, again, "ready again", ready(1))
	assert.NotEqual(t, first.MainPID, snap.MainPID, "a new engine")
	assert.Equal(t, uid, procCred(t, snap.MainPID).uid, "as the pool's uid still")
	assert.Equal(t, fmt.Sprint(uid), poolUID(t, e, "steady"))
}

// engineGroup is the gid of group pool-engine.
func engineGroup(t *testing.T) uint32 {
	t.Helper()
	out := strings.TrimSpace(sh(t, "getent", "group", "pool-engine"))
	f := strings.Split(out, ":")
	require.Len(t, f, 4, out)
	n, err := strconv.ParseUint(f[2], 10, 32)
	require.NoError(t, err)
	return uint32(n)
}
