package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func needPython(t *testing.T) string {
	t.Helper()
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("no python3 here")
	}
	return py
}

// engine runs cuda-engine.py with args and env, at most 20 s.
func engine(t *testing.T, env []string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, needPython(t), append([]string{"cuda-engine.py"}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("cuda-engine.py: %v", err)
	}
	return o.String(), e.String(), cmd.ProcessState.ExitCode()
}

func TestCUDAEngineCompiles(t *testing.T) {
	cmd := exec.Command(needPython(t), "-m", "py_compile", "cuda-engine.py")
	cmd.Env = append(os.Environ(), "PYTHONPYCACHEPREFIX="+t.TempDir())
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Equal(t, string(mustRead(t, "cuda-engine.py")), string(cudaEngineScript), "the program writes the file as it is")
}

func mustRead(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(name)
	require.NoError(t, err)
	return b
}

// Without the driver's library the engine says so and fails at once.
func TestCUDAEngineWithoutLibcuda(t *testing.T) {
	args := [][]string{{"--probe", "--libcuda", filepath.Join(t.TempDir(), "libcuda.so.1")}}
	if _, err := os.Stat("/usr/lib/x86_64-linux-gnu/libcuda.so.1"); err != nil {
		args = append(args, []string{"--port", "1"}) // and where the loader looks
	}
	for _, a := range args {
		start := time.Now()
		stdout, stderr, code := engine(t, nil, a...)
		assert.Equal(t, 1, code, a)
		assert.True(t, strings.HasPrefix(stderr, "cuda-engine: libcuda.so.1 not found (no NVIDIA driver here?): "), stderr)
		assert.Empty(t, stdout)
		assert.Less(t, time.Since(start), 10*time.Second)
	}
}

func TestCUDAEngineRefusesBadArguments(t *testing.T) {
	for _, a := range [][]string{{}, {"--port", "0"}, {"--port", "65536"}, {"--probe", "--mib", "-1"}, {"--probe", "--hold"}, {"--port", "x"}} {
		stdout, stderr, code := engine(t, nil, a...)
		assert.Equal(t, 2, code, a)
		assert.Contains(t, stderr, "usage: cuda-engine", a)
		assert.Empty(t, stdout, a)
	}
}

// On the stand-in libcuda: the calls, their failures as CUDA names them,
// and what the engine serves.
func TestCUDAEngineOnAStandInLibcuda(t *testing.T) {
	needPython(t)
	lib := fakeLibcuda(t)
	// /dev/null stands in for the GPU's nodes: it opens.
	env := []string{"FAKE_CUDA_CTL=/dev/null", "FAKE_CUDA_NODE=/dev/null"}

	t.Run("probe", func(t *testing.T) {
		stdout, stderr, code := engine(t, env, "--probe", "--mib", "16", "--libcuda", lib)
		assert.Equal(t, 0, code, stderr)
		assert.Regexp(t, `^cuda-engine: 16 MiB held on Fake GPU \(pid \d+\)\n$`, stdout)
	})
	for _, tc := range []struct{ name, env, want string }{
		{"no control node", "FAKE_CUDA_CTL=/nonexistent", "cuda-engine: cuInit failed: 100 CUDA_ERROR_NO_DEVICE\n"},
		{"GPU node refused", "FAKE_CUDA_NODE=/nonexistent", "cuda-engine: cuCtxCreate_v2 failed: 100 CUDA_ERROR_NO_DEVICE\n"},
		{"allocation fails", "FAKE_CUDA_FAIL=cuMemAlloc_v2", "cuda-engine: cuMemAlloc_v2 failed: 2 CUDA_ERROR_OUT_OF_MEMORY\n"},
		{"no device counted", "FAKE_CUDA_COUNT=0", "cuda-engine: cuDeviceGetCount counts no device (CUDA_VISIBLE_DEVICES=)\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			stdout, stderr, code := engine(t, append(env, tc.env), "--hold", "--libcuda", lib)
			assert.Equal(t, 1, code)
			assert.Equal(t, tc.want, stderr)
			assert.Regexp(t, cudaFailed, stderr, "gpu-check tells a CUDA failure by it")
			assert.Empty(t, stdout)
		})
	}
	t.Run("serve", func(t *testing.T) {
		port, err := freePort()
		require.NoError(t, err)
		cmd, line := startEngine(t, append(env, "CUDA_VISIBLE_DEVICES=GPU-x"), "--port", strconv.Itoa(port), "--mib", "8", "--libcuda", lib)
		assert.Equal(t, fmt.Sprintf("cuda-engine: 8 MiB held on Fake GPU (pid %d)", cmd.Process.Pid), line)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		info, err := getCUDA(ctx, port)
		require.NoError(t, err)
		assert.Equal(t, cudaInfo{PID: cmd.Process.Pid, Device: "Fake GPU", MiB: 8, Visible: "GPU-x"}, info)
		for path, want := range map[string]int{"/health": 200, "/cuda": 200, "/": 404, "/health/x": 404} {
			resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d%s", port, path))
			require.NoError(t, err)
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			assert.Equal(t, want, resp.StatusCode, path)
			if path == "/health" {
				assert.Equal(t, `{"status":"ok"}`, string(b))
			}
		}
		// The context holds the GPU's node open, as a real one does.
		hs, err := nodeOpeners("/proc", "/dev/null")
		require.NoError(t, err)
		assert.True(t, holds(hs, cmd.Process.Pid), holderList(hs))
	})
	t.Run("port taken", func(t *testing.T) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		defer l.Close()
		port := l.Addr().(*net.TCPAddr).Port
		stdout, stderr, code := engine(t, env, "--port", strconv.Itoa(port), "--libcuda", lib)
		assert.Equal(t, 1, code)
		assert.True(t, strings.HasPrefix(stderr, fmt.Sprintf("cuda-engine: port %d: ", port)), stderr)
		assert.Empty(t, stdout, "nothing said to be held and served")
	})
	t.Run("hold until SIGTERM", func(t *testing.T) {
		cmd, _ := startEngine(t, env, "--hold", "--mib", "8", "--libcuda", lib)
		time.Sleep(200 * time.Millisecond)
		require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			assert.NoError(t, err, "a stop is a clean exit")
		case <-time.After(10 * time.Second):
			t.Fatal("the holder did not end on SIGTERM")
		}
	})
}

// startEngine starts cuda-engine.py and returns once it printed that it
// holds the memory (its line); it is killed when the test ends.
func startEngine(t *testing.T, env []string, args ...string) (*exec.Cmd, string) {
	t.Helper()
	cmd := exec.Command(needPython(t), append([]string{"cuda-engine.py"}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	errFile := filepath.Join(t.TempDir(), "stderr")
	f, err := os.Create(errFile)
	require.NoError(t, err)
	defer f.Close()
	cmd.Stderr = f
	stderr := func() string { return string(mustRead(t, errFile)) }
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	lines := make(chan string, 1)
	go func() {
		l, _ := bufio.NewReader(out).ReadString('\n')
		lines <- strings.TrimSuffix(l, "\n")
	}()
	select {
	case l := <-lines:
		require.NotEmpty(t, l, "cuda-engine ended: %s", stderr())
		return cmd, l
	case <-time.After(15 * time.Second):
		t.Fatalf("cuda-engine did not hold its memory within 15 s: %s", stderr())
	}
	return nil, ""
}

// The host's word on CUDA before the sandbox: what worked, what failed.
func TestHostCUDA(t *testing.T) {
	py := needPython(t)
	lib := fakeLibcuda(t)
	t.Setenv("FAKE_CUDA_CTL", "/dev/null")
	t.Setenv("FAKE_CUDA_NODE", "/dev/null")
	var w bytes.Buffer
	hostCUDA(context.Background(), py, t.TempDir(), "GPU-x", lib, &w)
	assert.Regexp(t, `^\n\$ CUDA_VISIBLE_DEVICES=GPU-x \S+python3\S* \S+/cuda-engine.py --probe --mib 16 --libcuda \S+\n  cuda-engine: 16 MiB held on Fake GPU \(pid \d+\)\n  in \d+\.\d s\n$`, w.String())
	t.Setenv("FAKE_CUDA_FAIL", "cuInit")
	w.Reset()
	hostCUDA(context.Background(), py, t.TempDir(), "GPU-x", lib, &w)
	assert.Contains(t, w.String(), "cuda-engine: cuInit failed: 2 CUDA_ERROR_OUT_OF_MEMORY\n  it failed (exit status 1): the CUDA checks in the sandbox will too\n")
	w.Reset()
	hostCUDA(context.Background(), "", t.TempDir(), "GPU-x", lib, &w)
	assert.Equal(t, "  "+noPython+"\n", w.String())
}

func TestJudgeHeld(t *testing.T) {
	const refused = `Call failed: GPU GPU-1 in use by pid 42 (python3, uid 0, cgroup /system.slice/gpucheck-holder.service), outside pool-engine-gpucheck.scope: GPU in use by another process`
	const lastError = `s "GPU GPU-1 in use by pid 42 (python3, uid 0, cgroup /system.slice/gpucheck-holder.service), outside pool-engine-gpucheck.scope: GPU in use by another process"`
	failed := errors.New("exit status 1")
	assert.Empty(t, judgeHeld(refused, failed, `s "failed"`, lastError, "u 0", 42))
	assert.Equal(t, []string{"a start with another CUDA process on GPU 0 was not refused",
		`the refusal does not name the holder, pid 42: ""`,
		`the held pool's State is s "ready", not failed`,
		`LastError does not name the holder, pid 42: s ""`},
		judgeHeld("", nil, `s "ready"`, `s ""`, "u 0", 42))
	assert.Equal(t, []string{"the held start counted a crash: CrashCount u 1"}, judgeHeld(refused, failed, `s "failed"`, lastError, "u 1", 42))
	assert.Len(t, judgeHeld(refused, failed, `s "failed"`, lastError, "u 0", 4), 2, "pid 42 is not pid 4")
	memory := "Call failed: the pool needs 2G of GPU memory (MemoryRequired=): GPU GPU-1 has 1G free of 80G, used by pid 42 (python3, 79G); it starts once the memory is free: not enough free GPU memory"
	assert.Equal(t, []string{"the refusal does not name the holder, pid 42: " + strconv.Quote(memory)},
		judgeHeld(memory, failed, `s "failed"`, lastError, "u 0", 42), "the memory refusal is not the holder's")
}

func TestInCgroupOf(t *testing.T) {
	v2 := "0::/pool.slice/pool-managerd.slice/pool-managerd-engines.slice/pool-engine-gpucheck.scope\n"
	assert.True(t, inCgroupOf(v2, scope))
	hybrid := "5:devices:/pool-managerd-engines.slice/pool-engine-gpucheck.scope\n0::/pool-managerd-engines.slice/pool-engine-gpucheck.scope\n"
	assert.True(t, inCgroupOf(hybrid, scope))
	assert.False(t, inCgroupOf("0::/system.slice/gpucheck-holder.service\n", scope))
	assert.False(t, inCgroupOf("0::/pool-managerd-engines.slice/pool-engine-gpucheck.scope/x\n", scope), "a cgroup below is not the scope")
	assert.False(t, inCgroupOf("0::/pool-engine-xgpucheck.scope\n", scope))
	assert.False(t, inCgroupOf("", scope))
}

// An engine runs as a user of its pool's own: a python3 under a private
// home is no use to it.
func TestOthersMayRun(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.Chmod(filepath.Dir(dir), 0o755)) // the test's own, private
	f := filepath.Join(dir, "python3")
	require.NoError(t, os.WriteFile(f, []byte("#!/bin/sh\n"), 0o755))
	require.NoError(t, os.Chmod(dir, 0o700))
	assert.False(t, othersMayRun(f), "in a private directory")
	require.NoError(t, os.Chmod(dir, 0o755))
	assert.True(t, othersMayRun(f))
	require.NoError(t, os.Chmod(f, 0o750))
	assert.False(t, othersMayRun(f), "not for others")
	assert.False(t, othersMayRun(dir), "a directory")
	assert.False(t, othersMayRun(filepath.Join(dir, "none")))
	if py := findPython(); py != "" {
		r, err := filepath.EvalSymlinks(py)
		require.NoError(t, err)
		assert.True(t, othersMayRun(r), py)
	}
}

// Without a python3 every user may run there is none to use.
func TestFindPythonWithoutOne(t *testing.T) {
	dir := t.TempDir()
	private := filepath.Join(dir, "home")
	require.NoError(t, os.Mkdir(private, 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(private, "python3"), []byte("#!/bin/sh\n"), 0o755))
	old := pythons
	t.Cleanup(func() { pythons = old })
	pythons = []string{filepath.Join(dir, "none")}
	t.Setenv("PATH", private)
	assert.Empty(t, findPython(), "one in a private home is none")
	for _, d := range []string{filepath.Dir(dir), dir, private} {
		require.NoError(t, os.Chmod(d, 0o755))
	}
	assert.Equal(t, filepath.Join(private, "python3"), findPython())
}

// The script's bound is above the program's own in the sandbox, whose
// waits fit in it, and the whole stays under 8 minutes.
func TestTheBoundsAddUp(t *testing.T) {
	m := regexp.MustCompile(`(?m)^limit=(\d+)$`).FindSubmatch(mustRead(t, "gpu-check.sh"))
	require.NotNil(t, m, "gpu-check.sh sets limit=")
	n, err := strconv.Atoi(string(m[1]))
	require.NoError(t, err)
	limit := time.Duration(n) * time.Second
	// The host's part: nvidia-smi, the XID watch, the holder, the boot.
	const host = 90 * time.Second
	assert.GreaterOrEqual(t, limit, insideLimit+host)
	assert.Less(t, limit, 8*time.Minute)
	waits := startLimit + holdLimit + heldLimit + cudaLimit
	assert.Less(t, waits+60*time.Second, insideLimit, "the waits in the sandbox and a minute for the rest")
}
