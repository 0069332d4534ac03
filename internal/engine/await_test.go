package engine

import (
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// awaitExit returns once the child has ended, not before, and leaves it
// for cmd.Wait to reap with its status.
func TestAwaitExitLeavesTheChildToWait(t *testing.T) {
	cmd := exec.Command("sh", "-c", "sleep 0.3; exit 7")
	require.NoError(t, cmd.Start())
	t0 := time.Now()
	awaitExit(cmd.Process.Pid)
	assert.GreaterOrEqual(t, time.Since(t0), 250*time.Millisecond, "returned before the exit")
	err := cmd.Wait()
	var ee *exec.ExitError
	require.ErrorAs(t, err, &ee)
	assert.Equal(t, 7, ee.ExitCode())

	cmd = exec.Command("sleep", "60")
	require.NoError(t, cmd.Start())
	done := make(chan struct{})
	go func() {
		awaitExit(cmd.Process.Pid)
		close(done)
	}()
	select {
	case <-done:
		t.Fatal("returned while the child runs")
	case <-time.After(100 * time.Millisecond):
	}
	cmd.Process.Kill()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("did not return after the child was killed")
	}
	cmd.Wait()
	ws := cmd.ProcessState.Sys().(syscall.WaitStatus)
	assert.True(t, ws.Signaled())
	assert.Equal(t, syscall.SIGKILL, ws.Signal())
}
