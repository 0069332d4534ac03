package supervisor_test

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/llorch/pool-managerd/internal/lifecycle"
	. "github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/testpool"
)

// holdNodeEnv makes the test binary a process that holds a GPU's node
// open (O_PATH: the fake node has no driver behind it) until killed.
const holdNodeEnv = "POOL_TEST_HOLD_NODE"

func holdNode(node string) {
	if _, err := unix.Open(node, unix.O_PATH, 0); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println("holding")
	time.Sleep(time.Minute)
	os.Exit(0)
}

// Another process on the pool's GPU: the start says who holds it and is
// no crash; once the GPU is free, the pool starts by itself.
func TestAForeignProcessOnThePoolsGPUHoldsTheStart(t *testing.T) {
	lifecycle.GPURetry = 500 * time.Millisecond
	t.Cleanup(func() { lifecycle.GPURetry = 10 * time.Second })
	holder := exec.Command(os.Args[0])
	holder.Env = append(os.Environ(), holdNodeEnv+"=/dev/nvidia0")
	out, err := holder.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, holder.Start())
	t.Cleanup(func() { holder.Process.Kill(); holder.Wait() })
	buf := make([]byte, 8)
	n, _ := out.Read(buf)
	require.Equal(t, "holding", strings.TrimSpace(string(buf[:n])))

	e := testpool.New(t, nil)
	p := e.Start(testpool.Spec{ID: "held", Devices: "0", NoStart: true})
	err = p.Start()
	require.ErrorIs(t, err, lifecycle.ErrGPUBusy)
	pid := strconv.Itoa(holder.Process.Pid)
	assert.Contains(t, err.Error(), "pid "+pid)
	s := p.Snapshot()
	assert.Equal(t, Failed, s.State)
	assert.Contains(t, s.LastError, "pid "+pid+" (supervisor.test")
	assert.Zero(t, s.CrashCount, "another process on the GPU is no crash of ours")
	assert.False(t, s.Live)

	require.NoError(t, holder.Process.Kill())
	holder.Wait()
	got := waitFor(t, p, "ready once the GPU is free", ready(1))
	assert.Zero(t, got.CrashCount)
}
