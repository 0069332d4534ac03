package supervisor_test

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/lifecycle"
	. "github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

var squatters atomic.Int32

// squat has another user (nobody) serve the simulator on port, in a
// scope of its own, and returns once it answers /health with 200; leave
// ends it (also when the test ends).
func squat(t *testing.T, e *testpool.Env, port int) (pid int, leave func()) {
	t.Helper()
	sim := os.Getenv(sandbox.BinEnv("pool-engine-sim"))
	unit := fmt.Sprintf("squatter-%d.scope", squatters.Add(1))
	cmd := exec.Command("systemd-run", "--scope", "--quiet", "--unit="+unit, "--uid=nobody", "--gid=nogroup",
		"--", sim, "--model", filepath.Join(e.Dir, "model.gguf"), "--port", strconv.Itoa(port))
	require.NoError(t, cmd.Start())
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	leave = func() {
		exec.Command("systemctl", "stop", unit).Run()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	}
	t.Cleanup(leave)
	require.Eventually(t, func() bool {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/health", port))
		if err == nil {
			resp.Body.Close()
		}
		return err == nil && resp.StatusCode == http.StatusOK
	}, 10*time.Second, 20*time.Millisecond, "the squatter answers")
	return cmd.Process.Pid, leave
}

// namesTheSquatter checks that an error names the squatter: its user,
// its scope's cgroup and its pid, outside the pool's scope.
func namesTheSquatter(t *testing.T, msg, pool string, pid int) {
	t.Helper()
	assert.Contains(t, msg, "uid 65534 outside pool-engine-"+pool+".scope")
	assert.Regexp(t, `in cgroup /\S*squatter-\d+\.scope`, msg)
	assert.Contains(t, msg, "pid "+strconv.Itoa(pid))
}

// Another user listening on the pool's port when it starts holds the
// start: no engine, no crash, the breaker untouched, LastError names the
// squatter; the pool starts by itself once the port is free.
func TestASquatterOnThePortHoldsTheStartWithoutFeedingTheBreaker(t *testing.T) {
	e := testpool.New(t, nil)
	p := e.Start(testpool.Spec{ID: "squat", Devices: "0", NoStart: true})
	pid, leave := squat(t, e, p.Port)

	err := p.Start()
	require.ErrorIs(t, err, lifecycle.ErrPortBusy)
	s := p.Snapshot()
	assert.Equal(t, lifecycle.Failed, s.State)
	namesTheSquatter(t, s.LastError, "squat", pid)
	assert.Zero(t, s.Starts, "no engine beside the squatter")
	assert.Zero(t, s.Policy.CrashCount)
	assert.Zero(t, s.Policy.Streak)
	assert.Equal(t, "closed", s.Policy.Breaker.String())

	leave()
	got := waitFor(t, p, "ready on its own engine once the port is free", ready(1))
	assert.Zero(t, got.Policy.CrashCount)
}

// A squatter that takes the port while the pool waits to restart holds
// the restart: the crash that came before is the only one counted.
func TestASquatterDuringARestartCountsNoCrash(t *testing.T) {
	e := testpool.New(t, nil)
	p := e.Start(testpool.Spec{ID: "resquat", Devices: "0", Extra: "BackoffInitialSec=2\nBackoffMinSec=2\nBackoffMaxSec=2\n"})
	waitFor(t, p, "ready", ready(1))
	require.NoError(t, p.Fault("exit:1"))
	crashed := waitFor(t, p, "the crash", func(s Snapshot) bool { return s.Policy.CrashCount == 1 && !s.Live })
	pid, leave := squat(t, e, p.Port)

	held := waitFor(t, p, "the restart held", func(s Snapshot) bool {
		return s.State == lifecycle.Failed && strings.Contains(s.LastError, "not started until the port is free")
	})
	namesTheSquatter(t, held.LastError, "resquat", pid)
	assert.Equal(t, 1, held.Starts)
	assert.Equal(t, uint64(1), held.Policy.CrashCount, "the squatter is no crash")
	assert.Equal(t, crashed.Policy.Streak, held.Policy.Streak)
	assert.Equal(t, crashed.Policy.Breaker, held.Policy.Breaker)

	leave()
	got := waitFor(t, p, "ready again", ready(2))
	assert.Equal(t, uint64(1), got.Policy.CrashCount)
}

// A squatter that binds the port after the check but before the engine
// (which loads first) makes the engine's bind fail: that exit is no
// crash either.
func TestAnEngineThatLosesItsPortToASquatterCountsNoCrash(t *testing.T) {
	e := testpool.New(t, nil)
	p := e.Start(testpool.Spec{ID: "late", Devices: "0", NoStart: true, SimArgs: "--listen-after 3s"})
	require.NoError(t, p.Start())
	pid, leave := squat(t, e, p.Port)

	held := waitFor(t, p, "the engine's exit", func(s Snapshot) bool { return s.State == lifecycle.Failed })
	assert.Contains(t, held.LastError, "the engine could not listen")
	namesTheSquatter(t, held.LastError, "late", pid)
	assert.Zero(t, held.Policy.CrashCount)
	assert.Zero(t, held.Policy.Streak)
	assert.Equal(t, "closed", held.Policy.Breaker.String())

	leave()
	got := waitFor(t, p, "ready once the port is free", ready(2))
	assert.Zero(t, got.Policy.CrashCount)
}

// After Ready every probe still checks its peer: an engine that lets its
// port go (here it closes its listener) and a squatter that takes it and
// answers 200 make the probe fail; the pool is not Ready on the
// squatter's answers.
func TestASquatterAfterReadyFailsTheProbe(t *testing.T) {
	e := testpool.New(t, nil)
	p := e.Start(testpool.Spec{ID: "after", Devices: "0"})
	waitFor(t, p, "ready", ready(1))
	require.NoError(t, p.Fault("close-listener"))
	pid, _ := squat(t, e, p.Port)

	got := waitFor(t, p, "not ready on the squatter's answers", func(s Snapshot) bool {
		return !s.Ready && strings.Contains(s.LastError, "uid 65534")
	})
	namesTheSquatter(t, got.LastError, "after", pid)
}
