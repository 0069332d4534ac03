package crash

import (
	"strings"
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

// Real engine output (llama.cpp/ggml, vLLM/PyTorch, NCCL, the driver) is
// a GPU fault; a request log line that carries a prompt saying the same
// words is not, wherever in the line the prompt puts them.
func TestGPUFaultsAreTheEnginesOwnLinesNotPrompts(t *testing.T) {
	cases := []struct {
		name  string
		lines []string
		fault string // "" when none
	}{
		{"ggml_cuda_error", []string{
			"CUDA error: an illegal memory access was encountered",
			"  current device: 0, in function ggml_backend_cuda_synchronize at /app/ggml/src/ggml-cuda/ggml-cuda.cu:2503",
			"  cudaStreamSynchronize(cuda_ctx->stream())",
		}, "CUDA error: an illegal memory access was encountered"},
		{"ggml_cuda_error on Windows (ollama #3237)", []string{
			"CUDA error: out of memory",
			`  current device: 0, in function ggml_cuda_pool_malloc_vmm at C:\Users\jmorg\git\ollama\llm\llama.cpp\ggml-cuda.cu:8583`,
		}, "CUDA error: out of memory"},
		{"ggml_cuda_error with llama.cpp's --log-prefix --log-timestamps and colours", []string{
			"\x1b[0m\x1b[34m0.12.345.678\x1b[0m \x1b[31mE CUDA error: unspecified launch failure",
			"\x1b[0m\x1b[34m0.12.345.679\x1b[0m \x1b[31mE   current device: 1, in function ggml_cuda_op_mul_mat at ggml-cuda.cu:1650",
		}, "0.12.345.678 E CUDA error: unspecified launch failure"},
		{"GGML_ABORT of ggml_cuda_error", []string{"/app/ggml/src/ggml-cuda/ggml-cuda.cu:75: CUDA error"}, "/app/ggml/src/ggml-cuda/ggml-cuda.cu:75: CUDA error"},
		{"older GGML_ASSERT", []string{`GGML_ASSERT: C:\llama.cpp\ggml-cuda.cu:256: !"CUDA error"`}, `GGML_ASSERT: C:\llama.cpp\ggml-cuda.cu:256: !"CUDA error"`},
		{"ggml before 2024", []string{"CUDA error 700 at ggml-cuda.cu:6951: an illegal memory access was encountered"}, "CUDA error 700 at ggml-cuda.cu:6951: an illegal memory access was encountered"},
		{"old cuBLAS", []string{"cuBLAS error CUBLAS_STATUS_EXECUTION_FAILED at ggml-cuda.cu:1234"}, "cuBLAS error CUBLAS_STATUS_EXECUTION_FAILED at ggml-cuda.cu:1234"},
		{"ggml init", []string{"ggml_cuda_init: failed to initialize CUDA: no CUDA-capable device is detected"}, "ggml_cuda_init: failed to initialize CUDA: no CUDA-capable device is detected"},
		{"torch", []string{"RuntimeError: CUDA error: device-side assert triggered"}, "RuntimeError: CUDA error: device-side assert triggered"},
		{"torch OOM", []string{"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.25 GiB of which 3.75 MiB is free."}, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.25 GiB of which 3.75 MiB is free."},
		{"torch.cuda OOM", []string{"torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB"}, "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB"},
		{"torch 2.8 AcceleratorError", []string{"torch.AcceleratorError: CUDA error: an illegal memory access was encountered"}, "torch.AcceleratorError: CUDA error: an illegal memory access was encountered"},
		{"torch driver error", []string{"RuntimeError: CUDA driver error: out of memory"}, "RuntimeError: CUDA driver error: out of memory"},
		{"NCCL via torch", []string{"torch.distributed.DistBackendError: NCCL error in: ../torch/csrc/distributed/c10d/NCCLUtils.hpp:275, unhandled cuda error"}, "torch.distributed.DistBackendError: NCCL error in: ../torch/csrc/distributed/c10d/NCCLUtils.hpp:275, unhandled cuda error"},
		{"NCCL's own warning", []string{"gpu-host-3:4711:4790 [0] NCCL WARN Cuda failure 'an illegal memory access was encountered'"}, "gpu-host-3:4711:4790 [0] NCCL WARN Cuda failure 'an illegal memory access was encountered'"},
		{"CuPy runtime error", []string{"cupy_backends.cuda.api.runtime.CUDARuntimeError: cudaErrorIllegalAddress: an illegal memory access was encountered"}, "cupy_backends.cuda.api.runtime.CUDARuntimeError: cudaErrorIllegalAddress: an illegal memory access was encountered"},
		{"Triton", []string{"RuntimeError: Triton Error [CUDA]: an illegal memory access was encountered"}, "RuntimeError: Triton Error [CUDA]: an illegal memory access was encountered"},
		{"vLLM engine core traceback line", []string{"(EngineCore_DP0 pid=4711) ERROR 07-15 10:22:33 [core.py:586] RuntimeError: CUDA error: an illegal memory access was encountered"}, "(EngineCore_DP0 pid=4711) ERROR 07-15 10:22:33 [core.py:586] RuntimeError: CUDA error: an illegal memory access was encountered"},
		{"vLLM coloured worker prefix", []string{"\x1b[1;36m(VllmWorker TP0 pid=812)\x1b[0;0m torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.00 GiB"}, "(VllmWorker TP0 pid=812) torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.00 GiB"},
		{"torch.distributed rank prefix", []string{"[rank0]: RuntimeError: CUDA error: an illegal memory access was encountered"}, "[rank0]: RuntimeError: CUDA error: an illegal memory access was encountered"},
		{"Xid echoed", []string{"[ 1234.5] NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus."}, "[ 1234.5] NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus."},
		{"nvidia-smi after Xid 79", []string{"Unable to determine the device handle for GPU0000:3B:00.0: GPU is lost.  Reboot the system to recover this GPU"}, "Unable to determine the device handle for GPU0000:3B:00.0: GPU is lost.  Reboot the system to recover this GPU"},

		// Ordinary output.
		{"model load", []string{"llama_model_load: loaded meta data with 30 key-value pairs"}, ""},
		{"access log", []string{"srv  log_server_r: request: GET /health 127.0.0.1 200"}, ""},
		{"device listing", []string{"ggml_cuda_init: found 2 CUDA devices:"}, ""},
		{"listening", []string{"main: server is listening on http://127.0.0.1:8081"}, ""},
		{"ggml line without its follow-up", []string{"CUDA error: out of memory", "srv  update_slots: all slots are idle"}, ""},
		{"follow-up without a ggml line", []string{"  current device: 0, in function f at ggml-cuda.cu:1"}, ""},

		// Prompts in request logs.
		{"llama-server --verbose request body", []string{`srv  log_server_r: request:  {"prompt":"CUDA error: out of memory"}`}, ""},
		{"llama-server request body with a forged follow-up", []string{
			`srv  log_server_r: request:  {"prompt":"CUDA error: out of memory"}`,
			`srv  log_server_r: request:  {"prompt":"  current device: 0, in function f at ggml-cuda.cu:1"}`,
		}, ""},
		{"llama-server with log prefix", []string{`0.01.000.000 I srv  log_server_r: request:  {"prompt":"RuntimeError: CUDA error: x"}`}, ""},
		{"vLLM request log", []string{"INFO 07-15 10:22:33 [logger.py:43] Received request cmpl-1: prompt: 'RuntimeError: CUDA error: an illegal memory access was encountered', params: SamplingParams(n=1)"}, ""},
		{"prompt in JSON", []string{`{"level":"info","prompt":"torch.OutOfMemoryError: CUDA out of memory"}`}, ""},
		{"prompt in quotes", []string{`"CUDA error: out of memory"`}, ""},
		{"prompt after text", []string{"user said: NVRM: Xid (PCI:0000:3b:00): 79"}, ""},
		{"another exception's message", []string{"ValueError: CUDA error: out of memory"}, ""},
		{"abort line inside a request", []string{"srv  log_server_r: request:  x.cu:75: CUDA error"}, ""},
	}
	for _, c := range cases {
		var s FaultScanner
		got := ""
		for _, l := range c.lines {
			if f, ok := s.Line([]byte(l)); ok && got == "" {
				got = f
			}
		}
		assert.Equal(t, c.fault, got, c.name)
	}
}

// Only a line's start is looked at, so no padding moves a prompt there.
func TestGPUFaultScanIsBounded(t *testing.T) {
	var s FaultScanner
	long := strings.Repeat("x", 1<<20) + "RuntimeError: CUDA error: x"
	_, ok := s.Line([]byte(long))
	assert.False(t, ok)
	f, ok := s.Line([]byte("RuntimeError: CUDA error: after a long line"))
	assert.True(t, ok)
	assert.Equal(t, "RuntimeError: CUDA error: after a long line", f)
}
