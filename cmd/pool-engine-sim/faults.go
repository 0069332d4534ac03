package main

import (
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

type faultKind int

const (
	faultSegv faultKind = iota
	faultAbort
	faultCuda
	faultExit
	faultOOM
	faultHangHealth
	faultIgnoreTerm
	faultForkChild
	faultLongLine
	faultLog
	faultStall
	faultBusy
	faultFailCompletion
	faultNoMetrics
	faultBadMetrics
	faultHangMetrics
	faultCloseListener
	// vLLM's engine core (--engine vllm only, see vllm.go).
	faultChildExit
	faultChildExitServerExits
	faultChildOOM
	// vLLM's sleep mode: /sleep answers 500 and the engine stays awake;
	// /wake_up answers 500 and it stays asleep; /wake_up never answers.
	faultSleepFail
	faultWakeFail
	faultWakeHang
)

// faultKindsHelp lists the kinds for --fault's help and parse errors.
const faultKindsHelp = "segv, abort, cuda, oom, exit:N, hang-health, ignore-term, fork-child, long-line:N, log:TEXT, " +
	"stall, busy, fail-completion, no-metrics, bad-metrics, hang-metrics or close-listener"

var faultNames = map[string]faultKind{
	"segv":        faultSegv,
	"abort":       faultAbort,
	"cuda":        faultCuda,
	"oom":         faultOOM,
	"hang-health": faultHangHealth,
	"ignore-term": faultIgnoreTerm,
	"fork-child":  faultForkChild,
	"stall":       faultStall,
	"busy":        faultBusy,

	"fail-completion": faultFailCompletion,
	"no-metrics":      faultNoMetrics,
	"bad-metrics":     faultBadMetrics,
	"hang-metrics":    faultHangMetrics,
	"close-listener":  faultCloseListener,
}

// vllmFaultNames are the kinds only --engine vllm knows: faults of its
// engine-core process.
var vllmFaultNames = map[string]faultKind{
	"child-exit":              faultChildExit,
	"child-exit-server-exits": faultChildExitServerExits,
	"child-oom":               faultChildOOM,
	"sleep-fail":              faultSleepFail,
	"wake-fail":               faultWakeFail,
	"wake-hang":               faultWakeHang,
}

// beforeAnswer says whether /sim/fault puts the fault in effect before it
// answers, so that the caller's next request already sees it. The others
// end the process (or may: oom), so they fire once the answer is out.
func (k faultKind) beforeAnswer() bool {
	switch k {
	case faultSegv, faultAbort, faultCuda, faultExit, faultOOM, faultChildExitServerExits, faultChildOOM:
		return false
	}
	return true
}

type fault struct {
	kind faultKind
	code int    // exit status for faultExit, bytes for faultLongLine
	text string // the request line of faultLog
}

// maxLongLine bounds long-line:N; a test wants megabytes, not the host's
// memory.
const maxLongLine = 1 << 30

func (f fault) String() string {
	switch f.kind {
	case faultExit:
		return "exit:" + strconv.Itoa(f.code)
	case faultLongLine:
		return "long-line:" + strconv.Itoa(f.code)
	case faultLog:
		return "log:" + f.text
	}
	for _, names := range []map[string]faultKind{faultNames, vllmFaultNames} {
		for n, k := range names {
			if k == f.kind {
				return n
			}
		}
	}
	return "unknown"
}

func parseFault(s string) (fault, error) {
	if rest, ok := strings.CutPrefix(s, "exit:"); ok {
		n, err := strconv.Atoi(rest)
		if err != nil || n < 0 || n > 255 {
			return fault{}, fmt.Errorf("invalid exit status %q in fault %q (want exit:0..255)", rest, s)
		}
		return fault{kind: faultExit, code: n}, nil
	}
	if rest, ok := strings.CutPrefix(s, "long-line:"); ok {
		n, err := strconv.Atoi(rest)
		if err != nil || n < 1 || n > maxLongLine {
			return fault{}, fmt.Errorf("invalid length %q in fault %q (want long-line:1..%d)", rest, s, maxLongLine)
		}
		return fault{kind: faultLongLine, code: n}, nil
	}
	if rest, ok := strings.CutPrefix(s, "log:"); ok {
		return fault{kind: faultLog, text: rest}, nil
	}
	if k, ok := faultNames[s]; ok {
		return fault{kind: k}, nil
	}
	return fault{}, fmt.Errorf("unknown fault kind %q (want %s)", s, faultKindsHelp)
}

func (s *server) fire(f fault) {
	switch f.kind {
	case faultSegv:
		// A real segfault prints nothing.
		dieBySignal(syscall.SIGSEGV)
	case faultAbort:
		logf("/app/ggml/src/ggml.c:1503: GGML_ASSERT(ggml_can_repeat(b, a)) failed")
		dieBySignal(syscall.SIGABRT)
	case faultCuda:
		logf("CUDA error: an illegal memory access was encountered\n" +
			"  current device: 0, in function ggml_backend_cuda_synchronize at /app/ggml/src/ggml-cuda/ggml-cuda.cu:2503\n" +
			"  cudaStreamSynchronize(cuda_ctx->stream())\n" +
			"/app/ggml/src/ggml-cuda/ggml-cuda.cu:75: CUDA error")
		dieBySignal(syscall.SIGABRT)
	case faultExit:
		logf("srv  update_slots: fatal error, exiting with status %d", f.code)
		os.Exit(f.code)
	case faultOOM:
		go allocateUntilKilled()
	case faultHangHealth:
		s.hangHealth.Store(true)
		logf("sim: hang-health: /health will not answer any more")
	case faultIgnoreTerm:
		signal.Ignore(syscall.SIGTERM)
		logf("sim: ignore-term: ignoring SIGTERM from now on")
	case faultForkChild:
		forkChild()
	case faultLongLine:
		longLine(f.code)
	case faultLog:
		// llama-server --verbose logs each request's body as it came
		// (SRV_DBG in log_server_request); here it stays one line.
		logf("srv  log_server_r: request:  %s", strings.NewReplacer("\n", `\n`, "\r", `\r`).Replace(f.text))
	case faultStall:
		s.engine.stall()
		logf("sim: stall: a request stays in flight and no token is produced from now on")
	case faultBusy:
		s.engine.setBusy()
		logf("sim: busy: a request stays in flight, producing a token every %v", busyTokenTime)
	case faultFailCompletion:
		s.failCompletion.Store(true)
		logf("sim: fail-completion: /completion answers 500 from now on")
	case faultNoMetrics:
		s.metrics.Store(int32(metricsMissing))
		logf("sim: no-metrics: /metrics answers 404 from now on")
	case faultBadMetrics:
		s.metrics.Store(int32(metricsGarbled))
		logf("sim: bad-metrics: /metrics answers what no parser reads from now on")
	case faultHangMetrics:
		s.metrics.Store(int32(metricsHung))
		logf("sim: hang-metrics: /metrics will not answer any more")
	case faultCloseListener:
		// The process runs on, its port free for anyone to take.
		if s.closeListener() {
			logf("sim: close-listener: the HTTP listener is closed, the process runs on")
		}
	}
}

// longLine writes one line of n bytes (no newline but its end) to
// stderr, as an engine that logs a whole prompt or a tensor would; the
// write blocks for as long as nobody reads.
func longLine(n int) {
	chunk := make([]byte, 64<<10)
	for i := range chunk {
		chunk[i] = 'a' + byte(i%26)
	}
	logMu.Lock()
	defer logMu.Unlock()
	for n > 0 {
		k := min(n, len(chunk))
		if _, err := os.Stderr.Write(chunk[:k]); err != nil {
			return
		}
		n -= k
	}
	_, _ = os.Stderr.WriteString("\n")
}

// crashLikeC makes a SIGSEGV, SIGBUS or SIGABRT sent from outside (kill
// -SEGV) end the simulator by that signal, as it ends a C++ engine; Go's
// runtime would otherwise turn it into exit status 2.
func crashLikeC() {
	var act [4]uint64
	for _, sig := range []syscall.Signal{syscall.SIGSEGV, syscall.SIGBUS, syscall.SIGABRT} {
		if _, _, e := syscall.RawSyscall6(syscall.SYS_RT_SIGACTION, uintptr(sig),
			uintptr(unsafe.Pointer(&act)), 0, 8, 0, 0); e != 0 {
			logf("sim: rt_sigaction(%d): %v", sig, e)
		}
	}
}

// dieBySignal makes the parent's waitpid see WIFSIGNALED with sig, as for
// a crashing C++ engine. Go's runtime handles SIGSEGV and SIGABRT itself
// (exit status 2), so put back SIG_DFL behind its back first.
func dieBySignal(sig syscall.Signal) {
	runtime.LockOSThread()
	// Kernel struct sigaction: handler, flags, restorer, mask. All zero is
	// SIG_DFL with no flags and an empty mask, on amd64 and arm64 alike.
	var act [4]uint64
	if _, _, e := syscall.RawSyscall6(syscall.SYS_RT_SIGACTION, uintptr(sig),
		uintptr(unsafe.Pointer(&act)), 0, 8, 0, 0); e != 0 {
		logf("sim: rt_sigaction(%d): %v", sig, e)
	}
	mask := uint64(1) << (uint(sig) - 1)
	const sigUnblock = 1
	_, _, _ = syscall.RawSyscall6(syscall.SYS_RT_SIGPROCMASK, sigUnblock,
		uintptr(unsafe.Pointer(&mask)), 0, 8, 0, 0)
	// Aim at this thread, whose mask was just cleared.
	_ = syscall.Tgkill(os.Getpid(), syscall.Gettid(), sig)
	for {
		time.Sleep(time.Hour)
	}
}

const (
	oomChunk    = 8 << 20
	oomLogEvery = 64 << 20
	oomCap      = 8 << 30
)

// oomHeld keeps every chunk reachable so the GC cannot give memory back.
var oomHeld [][]byte

// allocateUntilKilled grows RSS (each page written) until the OOM killer or
// a cgroup memory limit ends the process.
func allocateUntilKilled() {
	page := os.Getpagesize()
	total := 0
	for total < oomCap {
		chunk := make([]byte, oomChunk)
		for i := 0; i < len(chunk); i += page {
			chunk[i] = 1
		}
		oomHeld = append(oomHeld, chunk)
		total += oomChunk
		if total%oomLogEvery == 0 {
			logf("sim: oom: %d MiB allocated", total>>20)
		}
	}
	logf("sim: oom: %d MiB allocated without being killed, giving up", total>>20)
	os.Exit(1)
}

// forkChild leaves behind a process in its own session that outlives this
// one, as a stray helper would; only killing the whole cgroup removes it.
// Its stdio is /dev/null so it does not hold the engine's log pipes open.
func forkChild() {
	exe, err := os.Executable()
	if err != nil {
		logf("sim: fork-child: %v", err)
		return
	}
	c := exec.Command(exe, "--sim-child")
	c.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := c.Start(); err != nil {
		logf("sim: fork-child: %v", err)
		return
	}
	logf("sim: fork-child: child %d started", c.Process.Pid)
	// Reap it should it die first; nothing waits on this.
	go func() { _ = c.Wait() }()
}
