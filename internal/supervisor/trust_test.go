package supervisor_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/lifecycle"
	. "github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// failedByBreaker runs a pool whose engine exits at once until its
// breaker opens.
func failedByBreaker(t *testing.T, e *testpool.Env, id string) *testpool.Pool {
	s := e.Pool(id, "0", "", "BreakerThreshold=1\n")
	waitFor(t, s, "ready", ready(1))
	require.NoError(t, s.Fault("exit:1"))
	failed := waitFor(t, s, "failed", func(p Snapshot) bool { return p.State == lifecycle.Failed })
	require.Equal(t, "open", failed.Policy.Breaker.String())
	return s
}

func TestStopThenStartDoesNotBypassTheBreaker(t *testing.T) {
	e := testpool.New(t, nil)
	s := failedByBreaker(t, e, "bypass")
	require.NoError(t, s.Stop(e.Ctx))
	require.Equal(t, lifecycle.Stopped, s.Snapshot().State)
	assert.ErrorIs(t, s.Start(), lifecycle.ErrBreakerOpen)
	snap := s.Snapshot()
	assert.Equal(t, 1, snap.Starts, "no engine was started")
	assert.Equal(t, "open", snap.Policy.Breaker.String())

	// AllowRestart is the override: one start, no counter reset.
	require.NoError(t, s.AllowRestart())
	require.NoError(t, s.Start())
	again := waitFor(t, s, "ready", ready(2))
	assert.Equal(t, uint64(1), again.Policy.CrashCount)
}

func TestReloadDoesNotBypassTheBreaker(t *testing.T) {
	e := testpool.New(t, nil)
	s := failedByBreaker(t, e, "rbypass")
	other := e.WriteModel("other.gguf", "GGUF\x03\x00\x00\x00 other")
	_, err := s.Reload(e.Ctx, other, time.Second)
	assert.ErrorIs(t, err, lifecycle.ErrBreakerOpen)
	require.NoError(t, s.Stop(e.Ctx))
	_, err = s.Reload(e.Ctx, other, time.Second)
	assert.ErrorIs(t, err, lifecycle.ErrBreakerOpen)
	snap := s.Snapshot()
	assert.Equal(t, 1, snap.Starts)
	assert.NotEqual(t, other, snap.Model, "a refused reload changes nothing")
}

func TestCorruptStateFileHoldsThePoolUntilResetBreaker(t *testing.T) {
	sandbox.Need(t)
	for id, text := range map[string]string{
		"truncated":  `{"crash_count": `,
		"impossible": `{"crash_count": 9, "breakers": {"classes": {"general": {"state": 7}}}}`,
	} {
		t.Run(id, func(t *testing.T) {
			e := testpool.New(t, nil)
			dir := filepath.Join(e.Dir, "state", "pools")
			require.NoError(t, os.MkdirAll(dir, 0o755))
			require.NoError(t, os.WriteFile(filepath.Join(dir, id+".json"), []byte(text), 0o600))
			s := e.Start(testpool.Spec{ID: id, Devices: "0", NoStart: true})
			snap := s.Snapshot()
			assert.Equal(t, lifecycle.Failed, snap.State, "an unreadable state fails closed")
			aside, _ := filepath.Glob(filepath.Join(dir, id+".json.corrupt-*"))
			if id == "truncated" {
				require.Len(t, aside, 1)
				assert.Contains(t, snap.LastError, aside[0], "it says where the bad file went")
			}
			assert.Contains(t, snap.LastError, "ResetBreaker")
			assert.ErrorIs(t, s.Start(), lifecycle.ErrBreakerOpen)
			assert.Zero(t, s.Snapshot().Starts)

			s.ResetBreaker()
			require.NoError(t, s.Start())
			waitFor(t, s, "ready", ready(1))
		})
	}
}

// The hold of a corrupt state file is kept on disk: a second supervisor on
// the same state directory (a daemon restart) is held too, with the same
// word, until ResetBreaker; null and {} are as corrupt as a torn file.
func TestCorruptStateFileHoldSurvivesADaemonRestart(t *testing.T) {
	sandbox.Need(t)
	for id, text := range map[string]string{
		"truncated":  `{"crash_count": `,
		"null":       `null`,
		"empty":      `{}`,
		"impossible": `{"crash_count": 9, "breakers": {"classes": {"general": {"state": 7}}}}`,
	} {
		t.Run(id, func(t *testing.T) {
			e := testpool.New(t, nil)
			dir := filepath.Join(e.Dir, "state", "pools")
			require.NoError(t, os.MkdirAll(dir, 0o755))
			require.NoError(t, os.WriteFile(filepath.Join(dir, id+".json"), []byte(text), 0o600))
			spec := testpool.Spec{ID: id, Devices: "0", NoStart: true}
			first := e.Start(spec).Snapshot()
			require.Equal(t, lifecycle.Failed, first.State, "a corrupt state fails closed")
			aside, _ := filepath.Glob(filepath.Join(dir, id+".json.corrupt-*"))
			require.Len(t, aside, 1, "the bad file is set aside")
			assert.Contains(t, first.LastError, aside[0])

			// The daemon restarts: the bad file is gone, the hold is not.
			s := e.Start(spec)
			snap := s.Snapshot()
			assert.Equal(t, lifecycle.Failed, snap.State, "the restarted daemon still holds the pool")
			assert.Equal(t, first.LastError, snap.LastError, "with the same word")
			assert.ErrorIs(t, s.Start(), lifecycle.ErrBreakerOpen)
			assert.Zero(t, s.Snapshot().Starts)

			s.ResetBreaker()
			require.NoError(t, s.Start())
			waitFor(t, s, "ready", ready(1))

			// Once lifted, a restart does not bring the hold back.
			after := e.Start(spec).Snapshot()
			assert.NotEqual(t, lifecycle.Failed, after.State, after.LastError)
			assert.Empty(t, after.Held)
		})
	}
}

func TestCorruptRuntimeRecordStillAdoptsTheEngine(t *testing.T) {
	e := testpool.New(t, nil)
	s := e.Pool("record", "0", "", "")
	first := waitFor(t, s, "ready", ready(1))
	rec := filepath.Join(e.Dir, "run", "pools", "record.json")
	require.Eventually(t, func() bool { _, err := os.Stat(rec); return err == nil }, 5*time.Second, 10*time.Millisecond)
	require.NoError(t, os.WriteFile(rec, []byte("{\"pool\": \"rec"), 0o644))

	// A second supervisor of the pool, as after a daemon restart.
	again := e.Start(testpool.Spec{ID: "record", Devices: "0", NoStart: true, Port: s.Port})
	ctx, cancel := context.WithTimeout(e.Ctx, 20*time.Second)
	defer cancel()
	adopted, err := again.Adopt(ctx, func(string) bool { return true })
	require.NoError(t, err)
	require.True(t, adopted, "the shim is the truth, the record a cache")
	snap := waitFor(t, again, "ready", func(p Snapshot) bool { return p.Ready })
	assert.Equal(t, first.MainPID, snap.MainPID, "the same engine, not a new one")
	assert.Zero(t, snap.Starts)
	assert.Zero(t, s.Snapshot().Policy.CrashCount, "the engine was never killed")
}

// Hashing a big model for its first start happens off the pool's loop:
// the pool answers, another pool starts and serves, and a drain calls
// the start off.
func TestHashingABigModelBlocksNothing(t *testing.T) {
	e := testpool.New(t, nil)
	big := filepath.Join(e.Dir, "models", "big.gguf")
	f, err := os.Create(big)
	require.NoError(t, err)
	_, err = f.WriteString("GGUF\x03\x00\x00\x00")
	require.NoError(t, err)
	// Sparse: nothing on disk, but every byte is hashed.
	require.NoError(t, f.Truncate(16<<30))
	require.NoError(t, f.Close())
	require.NoError(t, os.Chmod(big, 0o644))

	slow := e.Start(testpool.Spec{ID: "big", Devices: "0", Model: big, NoStart: true})
	started := make(chan error, 1)
	go func() { started <- slow.Start() }()
	waitFor(t, slow, "starting", func(p Snapshot) bool { return p.State == lifecycle.Starting })

	ping, cancel := context.WithTimeout(e.Ctx, time.Second)
	defer cancel()
	require.NoError(t, slow.Ping(ping), "the pool's loop answers while its model is hashed")
	other := e.Pool("small", "1", "", "")
	waitFor(t, other, "the other pool ready", ready(1))
	snap := slow.Snapshot()
	require.Equal(t, lifecycle.Starting, snap.State, "still hashing: the figures below mean something")
	require.False(t, snap.Live)

	res, err := slow.Drain(e.Ctx, time.Second)
	require.NoError(t, err)
	assert.Equal(t, lifecycle.Drained, res.Outcome)
	select {
	case err := <-started:
		assert.ErrorIs(t, err, lifecycle.ErrBusy, "the start was called off")
	case <-time.After(10 * time.Second):
		t.Fatal("Start did not return after the drain")
	}
	assert.Zero(t, slow.Snapshot().Starts, "no engine started after the drain")
	assert.Equal(t, lifecycle.Stopped, slow.Snapshot().State)
}

// A shim that stops reporting (killed, or cut off for a report it could
// not send whole) leaves an engine nobody watches: its scope is stopped at
// once and one crash counted, long before the restart is due.
func TestLostShimStopsTheScopeAndCountsOneCrash(t *testing.T) {
	e := testpool.New(t, nil)
	s := e.Pool("lost", "0", "", "BackoffInitialSec=5\nBackoffMinSec=5\nBackoffMaxSec=5\n")
	first := waitFor(t, s, "ready", ready(1))
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", first.MainPID))
	require.NoError(t, err)
	fields := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
	shim, err := strconv.Atoi(fields[1])
	require.NoError(t, err)
	require.NoError(t, syscall.Kill(shim, syscall.SIGKILL))

	crashed := waitFor(t, s, "the crash", func(p Snapshot) bool { return p.Policy.CrashCount == 1 })
	assert.Equal(t, lifecycle.Backoff, crashed.State)
	assert.Contains(t, crashed.LastError, "shim")
	require.Eventually(t, func() bool {
		return syscall.Kill(first.MainPID, 0) == syscall.ESRCH
	}, 3*time.Second, 20*time.Millisecond, "the orphaned engine is stopped with its scope")
	assert.Equal(t, uint64(1), s.Snapshot().Policy.CrashCount, "one crash, counted once")
	assert.Equal(t, 1, s.Snapshot().Starts, "well before the restart")
}
