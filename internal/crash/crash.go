// Package crash names the ways an engine dies and classifies a process exit
// into one of them. The names are also metric label values and journal
// CRASH_REASON values, so they never change once shipped.
package crash

import (
	"bytes"
	"fmt"
	"regexp"
	"strings"
	"syscall"
)

// Reason is why an engine stopped without being asked to.
type Reason string

const (
	ExitCode    Reason = "exit_code"
	Signal      Reason = "signal"
	CoreDump    Reason = "core_dump"
	OutOfMemory Reason = "out_of_memory"
	HealthCheck Reason = "health_check"
	// Stalled: alive and healthy by its probe, but requests in flight and
	// no token produced for StallSec=.
	Stalled      Reason = "stalled"
	CUDAError    Reason = "cuda_error"
	DriverXID    Reason = "driver_xid"
	StartFailure Reason = "start_failure"
)

// Reasons lists every reason in a stable order.
var Reasons = []Reason{ExitCode, Signal, CoreDump, OutOfMemory, HealthCheck, Stalled, CUDAError, DriverXID, StartFailure}

// ParseReason accepts exactly the names above.
func ParseReason(s string) (Reason, error) {
	for _, r := range Reasons {
		if string(r) == s {
			return r, nil
		}
	}
	names := make([]string, len(Reasons))
	for i, r := range Reasons {
		names[i] = string(r)
	}
	return "", fmt.Errorf("unknown crash reason %q (one of %s)", s, strings.Join(names, ", "))
}

// Class groups reasons that share a circuit breaker: a GPU that keeps
// faulting is a different problem from a binary that keeps exiting, and the
// operator should see which one tripped.
type Class string

const (
	// ClassGeneral is the pool-wide breaker: it trips on a run of mixed
	// failures that no single class explains.
	ClassGeneral Class = "general"
	ClassProcess Class = "process"
	ClassOOM     Class = "oom"
	ClassHealth  Class = "health"
	ClassCUDA    Class = "cuda"
	ClassStart   Class = "start"
)

// Classes lists the per-reason classes (not ClassGeneral) in a stable order.
var Classes = []Class{ClassProcess, ClassOOM, ClassHealth, ClassCUDA, ClassStart}

// Class returns the breaker class the reason belongs to.
func (r Reason) Class() Class {
	switch r {
	case OutOfMemory:
		return ClassOOM
	case HealthCheck, Stalled:
		return ClassHealth
	case CUDAError, DriverXID:
		return ClassCUDA
	case StartFailure:
		return ClassStart
	default:
		return ClassProcess
	}
}

// Exit is what is known about an engine's end when its process is gone.
type Exit struct {
	// Status is the wait status of the engine's main process.
	Status syscall.WaitStatus
	// OOMKilled is set when the cgroup's OOM counter rose or the kernel log
	// named the engine: systemd's own Result cannot be trusted for it.
	OOMKilled bool
	// CUDAFault is set when the engine printed a CUDA or driver error
	// before it died.
	CUDAFault bool
	// XID is set when NVML reported an XID event on one of the pool's GPUs.
	XID bool
	// Requested is set when the manager asked the engine to stop.
	Requested bool
}

// Classify returns the reason for an exit, or ok=false when the exit is not
// a crash: the manager asked for it, or the engine exited 0 on its own (a
// graceful exit, logged but never restarted).
func Classify(e Exit) (r Reason, ok bool) {
	if e.Requested {
		return "", false
	}
	// What the engine said before dying is more precise than how it died:
	// a CUDA fault usually ends in abort(), an OOM kill in SIGKILL.
	switch {
	case e.OOMKilled:
		return OutOfMemory, true
	case e.XID:
		return DriverXID, true
	case e.CUDAFault:
		return CUDAError, true
	}
	ws := e.Status
	switch {
	case ws.Exited() && ws.ExitStatus() == 0:
		return "", false
	case ws.Exited():
		return ExitCode, true
	case ws.Signaled() && ws.CoreDump():
		return CoreDump, true
	case ws.Signaled():
		return Signal, true
	}
	return ExitCode, true
}

// A GPU fault is recognised only where the engines print their own errors:
// at the start of a line, after at most the prefixes their loggers put
// there. Engines log requests, and a prompt that says "CUDA error" must not
// restart a pool; a request line always starts with the logger's own text
// ("srv  log_server_r: request: ...", "Received request ..."), so a fault
// pattern anchored behind a known prefix cannot be reached by a prompt.
var (
	// ANSI colour codes: llama.cpp's common_log ends a coloured line
	// with its reset, so the next line starts with one.
	ansi = regexp.MustCompile(`\x1b\[[0-9;]*m`)
	// Prefixes, stripped in any order, each at most once per pass:
	// - vLLM's per-process prefix, "(EngineCore_DP0 pid=4711) "
	//   (vllm/utils: _add_prefix);
	// - vLLM's logger, "ERROR 07-15 10:22:33 [core.py:586] "
	//   (vllm/logger.py: "%(levelname)s %(asctime)s [%(fileinfo)s:%(lineno)d]",
	//   datefmt "%m-%d %H:%M:%S"; older: without "[");
	// - torch.distributed's "[rank0]: ";
	// - llama.cpp's --log-timestamps "0.01.234.567 " and --log-prefix
	//   level "E " (common/log.cpp);
	// - indentation.
	prefixes = []*regexp.Regexp{
		regexp.MustCompile(`^\([\w .=-]{1,64} pid=\d{1,10}\) `),
		regexp.MustCompile(`^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \[?[\w./-]{1,128}:\d{1,6}\] `),
		regexp.MustCompile(`^\[rank\d{1,6}\]: ?`),
		regexp.MustCompile(`^\d{1,6}\.\d\d\.\d{3}\.\d{3} `),
		regexp.MustCompile(`^[IWED] `),
		regexp.MustCompile(`^[ \t]+`),
	}
	// ggml_cuda_error (ggml/src/ggml-cuda/ggml-cuda.cu) prints three lines
	// and aborts:
	//   CUDA error: an illegal memory access was encountered
	//     current device: 0, in function ggml_backend_cuda_synchronize at .../ggml-cuda.cu:2503
	//     cudaStreamSynchronize(cuda_ctx->stream())
	//   .../ggml-cuda.cu:75: CUDA error
	// The first counts only with its "current device:" follow-up.
	ggmlError    = regexp.MustCompile(`^CUDA error: \S`)
	ggmlFollowUp = regexp.MustCompile(`^current device: -?\d+, in function \S+ at .+:\d+$`)
	// Lines that are a fault on their own.
	gpuFaults = regexp.MustCompile(`^(?:` + strings.Join([]string{
		// GGML_ABORT of ggml_cuda_error: "<file>.cu:<line>: CUDA error".
		`\S+\.cu:\d+: CUDA error$`,
		`GGML_ASSERT: \S+\.cu:\d+: !"CUDA error"$`,
		// ggml before 2024: "CUDA error 700 at ggml-cuda.cu:6951: an
		// illegal memory access was encountered", "cuBLAS error 13 at ...".
		`CUDA error \d+ at \S+:\d+: `,
		`cuBLAS error \w+ at \S+:\d+`,
		// ggml_cuda_init: failed to initialize CUDA: no CUDA-capable device is detected
		`ggml_cuda_init: failed to initialize CUDA: `,
		// PyTorch (vLLM, TGI): the exception's last traceback line,
		// "RuntimeError: CUDA error: device-side assert triggered",
		// "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate
		// 2.00 GiB", "torch.AcceleratorError: CUDA error: ..." (torch >=
		// 2.8), "torch.distributed.DistBackendError: NCCL error in: ...",
		// "RuntimeError: Triton Error [CUDA]: ...", and CuPy's
		// "cupy_backends.cuda.api.runtime.CUDARuntimeError:
		// cudaErrorIllegalAddress: ...". Only these exception types:
		// another's message may start with a request's text.
		`(?:RuntimeError|torch\.(?:cuda\.)?OutOfMemoryError|torch\.AcceleratorError|torch\.distributed\.DistBackendError|` +
			`cupy_backends\.cuda\.api\.(?:runtime|driver)\.CUDA(?:Runtime|Driver)Error): ` +
			`(?:CUDA error: |CUDA out of memory|CUDA driver error: |CUDA error \d+|cuDNN error: |NCCL [Ee]rror|Triton Error \[CUDA\]: |cudaError\w+: |CUDA_ERROR_\w+: )`,
		// NCCL's own log: "host:4711:4790 [0] NCCL WARN Cuda failure 'an
		// illegal memory access was encountered'" (src/include/debug.h).
		`[\w.-]+:\d+:\d+ \[\d+\] NCCL WARN Cuda failure `,
		// The kernel's Xid line, echoed by an engine wrapper.
		`(?:\[\s*\d+\.\d+\] )?NVRM: Xid \(`,
		// nvidia-smi after an Xid 79.
		`Unable to determine the device handle for GPU\S*: GPU is lost`,
	}, "|") + `)`)
	// keywords is a cheap first test: most lines hold none of these.
	keywords = [][]byte{[]byte("CUDA"), []byte("cuda"), []byte("NCCL"), []byte("cuDNN"), []byte("cuBLAS"), []byte("NVRM"), []byte("GPU is lost"), []byte("current device")}
)

// scanMax bounds what of a line is looked at: every fault line is short,
// and an engine's line may be megabytes.
const scanMax = 4096

// FaultScanner finds GPU faults in one output stream of an engine, read
// line by line: a fault that spans lines is seen only in its order.
type FaultScanner struct {
	pending string // a ggml "CUDA error:" line waiting for its follow-up
}

// Line takes the stream's next line (only the start of a long one) and
// returns the fault it shows or completes, as the engine wrote it (less
// colour codes).
func (s *FaultScanner) Line(line []byte) (fault string, ok bool) {
	pending := s.pending
	s.pending = ""
	if len(line) > scanMax {
		line = line[:scanMax]
	}
	if !hasKeyword(line) {
		return "", false
	}
	text := ansi.ReplaceAllString(string(line), "")
	msg := stripPrefixes(text)
	switch {
	case pending != "" && ggmlFollowUp.MatchString(msg):
		return pending, true
	case ggmlError.MatchString(msg):
		s.pending = text
		return "", false
	case gpuFaults.MatchString(msg):
		return text, true
	}
	return "", false
}

func hasKeyword(line []byte) bool {
	for _, k := range keywords {
		if bytes.Contains(line, k) {
			return true
		}
	}
	return false
}

func stripPrefixes(s string) string {
	for range len(prefixes) {
		stripped := false
		for _, p := range prefixes {
			if loc := p.FindStringIndex(s); loc != nil && loc[1] > 0 {
				s = s[loc[1]:]
				stripped = true
			}
		}
		if !stripped {
			break
		}
	}
	return s
}
