package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/gpu"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
)

// Inside a sandbox this test binary is gpu-check's inside part, as the
// real binary is.
func TestMain(m *testing.M) {
	if sandbox.Inside() {
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

func hostHasNVIDIA(t *testing.T) {
	if _, err := exec.LookPath("nvidia-smi"); err == nil {
		t.Skip("this host has nvidia-smi: run make gpu-check instead")
	}
	for _, p := range []string{"/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1", "/usr/lib64/libnvidia-ml.so.1", "/usr/lib/libnvidia-ml.so.1"} {
		if _, err := os.Stat(p); err == nil {
			t.Skip("this host has libnvidia-ml")
		}
	}
}

// On a host without an NVIDIA GPU the script says so and exits 2 at once,
// before it builds, boots or writes anything.
func TestGPUCheckScriptWithoutAGPUExits2AtOnce(t *testing.T) {
	hostHasNVIDIA(t)
	fakeSMI := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(fakeSMI, "nvidia-smi"), []byte("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-8f2c1a70-0000-4000-8000-000000000000)'\n"), 0o755))
	for _, tc := range []struct {
		name, path string
	}{
		{name: "no nvidia-smi", path: "/usr/bin:/bin:/usr/sbin:/sbin"},
		{name: "nvidia-smi without libnvidia-ml", path: fakeSMI + ":/usr/bin:/bin:/usr/sbin:/sbin"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tmp := t.TempDir()
			var stdout, stderr bytes.Buffer
			cmd := exec.Command("sh", "gpu-check.sh")
			cmd.Env = []string{"PATH=" + tc.path, "TMPDIR=" + tmp, "HOME=" + tmp}
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			start := time.Now()
			err := cmd.Run()
			var ee *exec.ExitError
			require.True(t, errors.As(err, &ee), "exit status: %v", err)
			assert.Equal(t, 2, ee.ExitCode())
			assert.Equal(t, "gpu-check: no NVIDIA GPU: nvidia-smi/libnvidia-ml not found\n", stderr.String())
			assert.Empty(t, stdout.String())
			assert.Less(t, time.Since(start), 5*time.Second)
			left, err := os.ReadDir(tmp)
			require.NoError(t, err)
			assert.Empty(t, left, "nothing written")
		})
	}
}

// The program itself, run by hand on such a host, says the same.
func TestGPUCheckWithoutNVMLExits2(t *testing.T) {
	lib := gpu.NewNVML()
	initErr := lib.Init()
	if initErr == nil {
		lib.Shutdown()
		t.Skip("NVML loads here")
	}
	work := t.TempDir()
	var stdout, stderr bytes.Buffer
	code := run([]string{"-work", work}, &stdout, &stderr)
	assert.Equal(t, 2, code)
	assert.True(t, strings.HasPrefix(stderr.String(), "gpu-check: no NVIDIA GPU: "), stderr.String())
	if errors.Is(initErr, gpu.ErrNoLibrary) {
		assert.Equal(t, "gpu-check: "+NoGPU+"\n", stderr.String())
	}
	assert.Empty(t, stdout.String())
	left, err := os.ReadDir(work)
	require.NoError(t, err)
	assert.Empty(t, left, "nothing written")
}

// The sandbox half of gpu-check, on fake GPU nodes with a static inventory
// (no GPU here): the daemon as packaged runs a pool on GPU 0, and each
// check is made and can fail; nothing of the sandbox is left after it.
func TestGPUCheckSandboxPartOnFakeGPUs(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("boots a private systemd: needs root")
	}
	env, _, cleanup, err := sandbox.Build("github.com/llorch/pool-managerd/cmd/pool-managerd",
		"github.com/llorch/pool-managerd/cmd/pool-managerd-shim", "github.com/llorch/pool-managerd/cmd/pool-engine-sim")()
	if cleanup != nil {
		defer cleanup()
	}
	require.NoError(t, err)
	bin := filepath.Dir(strings.SplitN(env[0], "=", 2)[1])
	lib := fakeLibcuda(t)
	py := findPython()
	if py == "" {
		t.Skip("no python3 every user may run: the CUDA engine cannot run here")
	}
	const uuid0 = "GPU-8f2c1a70-0000-4000-8000-000000000000"
	inventory := "Backend=static\nDevice=0 " + uuid0 + " /dev/nvidia0\nDevice=1 GPU-8f2c1a70-0000-4000-8000-000000000001 /dev/nvidia1\nControlDevice=/dev/nvidiactl\n"

	for _, tc := range []struct {
		name    string
		node    string // where the host side believes GPU 0 is
		want    []string
		wantErr string
	}{
		{name: "GPU 0 is confined to its node", node: "/dev/nvidia0", want: []string{
			"DevicePolicy=closed", "DeviceAllow=/dev/nvidia0 rw", "CUDA_VISIBLE_DEVICES=" + uuid0,
			"/dev/nvidia0: ENXIO", "/dev/nvidia1: EPERM", "armed: no NVML error from the daemon's watch in 1s",
			"memory fit: the static inventory cannot tell free memory; the daemon said so 1 time(s)",
			// A CUDA process of no pool holds GPU 0: the start waits for it.
			"seen on GPU 0 (/dev/nvidia0 open (/proc): PID ", `State s "failed", CrashCount u 0`,
			"in use by pid ", "outside pool-engine-gpucheck.scope", "the pool started by itself: Ready ",
			"CrashCount u 0, FailureStreak u 0",
			// The CUDA engine in the pool's scope.
			"cuda-engine.py --port %p --mib 256 --libcuda ", "/pool-engine-gpucheck.scope\n",
			"the engine says: {PID:", "MiB:256 Visible:" + uuid0 + "}",
			"cuda-engine: cuCtxCreate_v2 failed: 100 CUDA_ERROR_NO_DEVICE"}},
		{name: "a scope on another node than GPU 0's fails the check", node: "/dev/nvidia1", want: []string{
			"FAIL: the scope does not allow GPU 0's node /dev/nvidia1", "FAIL: the scope allows /dev/nvidia0, another GPU's node",
			"FAIL: the engine may not open its GPU's node /dev/nvidia1: EPERM",
			"FAIL: the engine opens another GPU's node /dev/nvidia0: ENXIO, not EPERM"},
			wantErr: "the check in the sandbox failed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			work, err := os.MkdirTemp("", "gpu-check-test-")
			require.NoError(t, err)
			defer os.RemoveAll(work)
			require.NoError(t, os.Chmod(work, 0o755))
			ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
			defer cancel()
			var stdout, stderr bytes.Buffer
			// The stand-in for the driver's libcuda, where the engines' users read it.
			b, err := os.ReadFile(lib)
			require.NoError(t, err)
			require.NoError(t, os.WriteFile(filepath.Join(work, "libcuda.so.1"), b, 0o644))
			p := plan{Bin: bin, Work: work, Inventory: inventory, UUID: uuid0, Node: tc.node,
				Control: []string{"/dev/nvidiactl"}, CUDALib: filepath.Join(work, "libcuda.so.1")}
			// Run from the repository root, as the script does.
			wd, err := os.Getwd()
			require.NoError(t, err)
			require.NoError(t, os.Chdir("../../.."))
			defer os.Chdir(wd)
			err = sandboxCheck(ctx, p, sandbox.FakeGPUs, time.Second, &stdout, &stderr)
			if tc.wantErr != "" {
				assert.ErrorContains(t, err, tc.wantErr)
			} else {
				assert.NoError(t, err, "%s\n%s", stdout.String(), stderr.String())
			}
			for _, w := range tc.want {
				assert.Contains(t, stdout.String(), w)
			}
			tag, err := os.ReadFile(filepath.Join(work, "sandbox-tag"))
			require.NoError(t, err)
			left, _ := filepath.Glob("/sys/fs/cgroup/*/" + strings.TrimSpace(string(tag)))
			if _, err := os.Stat("/sys/fs/cgroup/" + strings.TrimSpace(string(tag))); err == nil {
				left = append(left, "/sys/fs/cgroup/"+strings.TrimSpace(string(tag)))
			}
			assert.Empty(t, left, "the sandbox's cgroups are gone")
			if t.Failed() {
				t.Logf("stdout:\n%s\nstderr:\n%s", stdout.String(), stderr.String())
			}
		})
	}
}

// fakeLibcuda builds the stand-in for the driver's libcuda.so.1
// (testdata/fakecuda.c).
func fakeLibcuda(t *testing.T) string {
	t.Helper()
	if _, err := exec.LookPath("gcc"); err != nil {
		t.Skip("no gcc: the stand-in libcuda cannot be built")
	}
	lib := filepath.Join(t.TempDir(), "libcuda.so.1")
	out, err := exec.Command("gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", lib, "testdata/fakecuda.c").CombinedOutput()
	require.NoError(t, err, "%s", out)
	return lib
}

// The holder check follows a holder's children: a shell may fork the
// program that holds the GPU.
func TestDescends(t *testing.T) {
	assert.True(t, descends(os.Getpid(), os.Getpid()))
	assert.True(t, descends(os.Getpid(), os.Getppid()))
	assert.False(t, descends(os.Getppid(), os.Getpid()))
	assert.False(t, descends(1<<22+1, os.Getpid()), "no such process")
}
