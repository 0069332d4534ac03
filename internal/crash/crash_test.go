package crash

import (
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
)

// Wait statuses as the kernel encodes them.
func exited(code int) syscall.WaitStatus { return syscall.WaitStatus(code << 8) }
func signaled(sig syscall.Signal, core bool) syscall.WaitStatus {
	ws := syscall.WaitStatus(sig)
	if core {
		ws |= 0x80
	}
	return ws
}

func TestClassify(t *testing.T) {
	cases := []struct {
		name string
		exit Exit
		want Reason
		ok   bool
	}{
		{"graceful exit 0", Exit{Status: exited(0)}, "", false},
		{"requested stop killed", Exit{Status: signaled(syscall.SIGKILL, false), Requested: true}, "", false},
		{"exit 1", Exit{Status: exited(1)}, ExitCode, true},
		{"SIGSEGV", Exit{Status: signaled(syscall.SIGSEGV, false)}, Signal, true},
		{"SIGSEGV with core", Exit{Status: signaled(syscall.SIGSEGV, true)}, CoreDump, true},
		{"OOM kill", Exit{Status: signaled(syscall.SIGKILL, false), OOMKilled: true}, OutOfMemory, true},
		{"CUDA abort", Exit{Status: signaled(syscall.SIGABRT, true), CUDAFault: true}, CUDAError, true},
		{"XID", Exit{Status: exited(1), XID: true, CUDAFault: true}, DriverXID, true},
	}
	for _, c := range cases {
		r, ok := Classify(c.exit)
		assert.Equal(t, c.ok, ok, c.name)
		assert.Equal(t, c.want, r, c.name)
	}
}

func TestReasons(t *testing.T) {
	for _, r := range Reasons {
		got, err := ParseReason(string(r))
		assert.NoError(t, err)
		assert.Equal(t, r, got)
		assert.NotEqual(t, ClassGeneral, r.Class())
	}
	_, err := ParseReason("gremlins")
	assert.ErrorContains(t, err, "cuda_error")
}

func TestGPUFault(t *testing.T) {
	for _, l := range []string{
		"CUDA error: an illegal memory access was encountered",
		"RuntimeError: CUDA error: device-side assert triggered",
		"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
		"cuBLAS error CUBLAS_STATUS_EXECUTION_FAILED at ggml-cuda.cu:1234",
		"torch.distributed.DistBackendError: NCCL error in: ../torch/csrc/distributed/c10d/NCCLUtils.hpp:275, unhandled cuda error",
		"ggml_cuda_init: failed to initialize CUDA: no CUDA-capable device is detected",
		"[ 1234.5] NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus.",
	} {
		assert.True(t, GPUFault(l), l)
	}
	for _, l := range []string{
		"llama_model_load: loaded meta data with 30 key-value pairs",
		"srv  log_server_r: request: GET /health 127.0.0.1 200",
		"ggml_cuda_init: found 2 CUDA devices:",
		"main: server is listening on http://127.0.0.1:8081",
	} {
		assert.False(t, GPUFault(l), l)
	}
}
