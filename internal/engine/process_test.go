package engine_test

import (
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/engine"
	"github.com/llorch/pool-managerd/internal/sockdiag"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
)

// sleep runs sleep as a child of the test; it is killed when the test ends.
func sleep(t *testing.T, argv ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(argv[0], argv[1:]...)
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

// OpenProcess says who a process is: its uid and its cgroup by path and
// id, the id the kernel gives its sockets.
func TestOpenProcessReadsUIDAndCgroup(t *testing.T) {
	c := sleep(t, "sleep", "60")
	p, err := engine.OpenProcess(c.Process.Pid)
	require.NoError(t, err)
	defer p.Close()
	assert.Equal(t, uint32(os.Getuid()), p.UID)
	id, err := sockdiag.CgroupID(c.Process.Pid)
	require.NoError(t, err)
	assert.Equal(t, id, p.CgroupID)
	assert.NotEmpty(t, p.Cgroup)
	assert.Contains(t, p.String(), "pid "+strconv.Itoa(c.Process.Pid)+" (uid ")

	_, err = engine.OpenProcess(0)
	assert.Error(t, err)
	require.NoError(t, c.Process.Kill())
	c.Wait()
	_, err = engine.OpenProcess(c.Process.Pid)
	assert.ErrorIs(t, err, engine.ErrGone)
}

// A pidfd held across the end of its process and the reuse of its pid
// never signals the process that took the pid: the kill is ErrGone, and
// the new process lives on (kill(2) by the number would have hit it).
func TestAPidfdNeverSignalsTheProcessThatTookItsPid(t *testing.T) {
	sandbox.Need(t) // its own PID namespace: ns_last_pid is the test's
	old := sleep(t, "sleep", "60")
	pid := old.Process.Pid
	p, err := engine.OpenProcess(pid)
	require.NoError(t, err)
	defer p.Close()
	require.NoError(t, old.Process.Kill())
	old.Wait()

	var reused *exec.Cmd
	for range 50 {
		require.NoError(t, os.WriteFile("/proc/sys/kernel/ns_last_pid", []byte(strconv.Itoa(pid-1)), 0o644))
		c := sleep(t, "sleep", "60")
		if c.Process.Pid == pid {
			reused = c
			break
		}
	}
	require.NotNil(t, reused, "pid %d was not reused", pid)

	assert.ErrorIs(t, p.Signal(syscall.SIGKILL), engine.ErrGone)
	assert.True(t, p.Wait(0), "the pidfd's process has ended")
	time.Sleep(50 * time.Millisecond)
	assert.NoError(t, syscall.Kill(pid, 0), "the process with the pid now lives on")
	st, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	require.NoError(t, err)
	assert.NotContains(t, string(st), ") Z ", "not killed")
}

// signalEnv makes the test binary signal a pid through a pidfd and print
// what came of it (it is run without CAP_KILL).
const signalEnv = "ENGINE_TEST_SIGNAL_PID"

func signalMain(pid string) int {
	n, _ := strconv.Atoi(pid)
	p, err := engine.OpenProcess(n)
	if err != nil {
		println("open:", err.Error())
		return 1
	}
	err = p.Signal(syscall.SIGKILL)
	if err == nil {
		println("signalled")
		return 0
	}
	println("refused:", err.Error())
	return 0
}

// Without CAP_KILL, another user's process cannot be signalled: the
// pidfd says EPERM, which is not its death, and it lives on.
func TestAProcessThatCannotBeSignalledSaysSo(t *testing.T) {
	sandbox.Need(t)
	other := sleep(t, "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "sleep", "60")
	exe, err := os.Executable()
	require.NoError(t, err)
	cmd := exec.Command("setpriv", "--bounding-set=-kill", "--inh-caps=-kill", "--", exe)
	cmd.Env = append(os.Environ(), signalEnv+"="+strconv.Itoa(other.Process.Pid))
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Contains(t, string(out), "refused: signalling pid "+strconv.Itoa(other.Process.Pid)+": operation not permitted")
	assert.NoError(t, syscall.Kill(other.Process.Pid, 0), "it lives on")
}
