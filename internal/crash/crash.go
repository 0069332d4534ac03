// Package crash names the ways an engine dies and classifies a process exit
// into one of them. The names are also metric label values and journal
// CRASH_REASON values, so they never change once shipped.
package crash

import (
	"fmt"
	"strings"
	"syscall"
)

// Reason is why an engine stopped without being asked to.
type Reason string

const (
	ExitCode     Reason = "exit_code"
	Signal       Reason = "signal"
	CoreDump     Reason = "core_dump"
	OutOfMemory  Reason = "out_of_memory"
	HealthCheck  Reason = "health_check"
	CUDAError    Reason = "cuda_error"
	DriverXID    Reason = "driver_xid"
	StartFailure Reason = "start_failure"
)

// Reasons lists every reason in a stable order.
var Reasons = []Reason{ExitCode, Signal, CoreDump, OutOfMemory, HealthCheck, CUDAError, DriverXID, StartFailure}

// ParseReason accepts exactly the names above.
func ParseReason(s string) (Reason, error) {
	for _, r := range Reasons {
		if string(r) == s {
			return r, nil
		}
	}
	return "", fmt.Errorf("unknown crash reason %q (one of exit_code, signal, core_dump, out_of_memory, health_check, cuda_error, driver_xid, start_failure)", s)
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
	case HealthCheck:
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

// gpuFaults are what CUDA, cuBLAS, NCCL and the driver print when the GPU
// side of an engine fails, in llama.cpp, PyTorch/vLLM and TGI alike. A
// line containing any of them is a cuda_error: the engine is not to be
// trusted after it even if it keeps running.
var gpuFaults = []string{
	"CUDA error",                     // ggml-cuda: "CUDA error: an illegal memory access was encountered"; torch: "RuntimeError: CUDA error: ..."
	"CUDA out of memory",             // torch.cuda.OutOfMemoryError
	"cudaErrorIllegalAddress",        // raw runtime error names
	"cudaErrorLaunchFailure",         //
	"cudaErrorECCUncorrectable",      //
	"uncorrectable ECC error",        //
	"CUBLAS_STATUS_EXECUTION_FAILED", // cuBLAS
	"CUBLAS_STATUS_ALLOC_FAILED",     //
	"CUBLAS_STATUS_INTERNAL_ERROR",   //
	"NCCL error",                     // multi-GPU collectives
	"no CUDA-capable device is detected",
	"CUDA driver version is insufficient",
	"GPU is lost", // nvidia-smi / driver after an Xid 79
	"NVRM: Xid",   // engines that echo the kernel's Xid line
}

// GPUFault reports whether an engine output line says the GPU side failed.
func GPUFault(line string) bool {
	for _, p := range gpuFaults {
		if strings.Contains(line, p) {
			return true
		}
	}
	return false
}
