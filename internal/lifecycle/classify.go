package lifecycle

import (
	"fmt"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/llorch/pool-managerd/internal/crash"
)

// classify adds to crash.Classify what only the pool knows: that it
// stopped the engine for failing its probes, its start or a GPU fault.
func classify(r *run, x Exit) (crash.Reason, bool) {
	// A lost shim that the scope's counter shows an OOM kill beside (the
	// kernel can kill the shim too, on the engine's heels) is the OOM's.
	if x.Lost && !escalated(r, x) && x.OOMKills == 0 {
		return crash.Signal, true
	}
	reason, ok := crash.Classify(crash.Exit{Status: x.Status, OOMKilled: x.OOMKills > 0, CUDAFault: r.fault != ""})
	switch r.stopping {
	case StopHealth:
		if reason != crash.OutOfMemory && reason != crash.CUDAError {
			return crash.HealthCheck, true
		}
	case StopStartTimeout:
		return crash.StartFailure, true
	case StopStall:
		if reason != crash.OutOfMemory && reason != crash.CUDAError {
			return crash.Stalled, true
		}
	case StopFault:
		if r.xid {
			return crash.DriverXID, true
		}
		return crash.CUDAError, true
	}
	return reason, ok
}

// SignalName is a signal's name as kill -l spells it, with SIG.
func SignalName(sig syscall.Signal) string {
	if n := unix.SignalName(sig); n != "" {
		return n
	}
	return fmt.Sprintf("signal %d", int(sig))
}

// describe says what became of the engine, for LastError and the crash
// entry.
func describe(reason crash.Reason, r *run, x Exit) string {
	ws := x.Status
	how := ""
	switch {
	case escalated(r, x):
		how = "it did not exit on SIGTERM within its stop timeout, and its scope was killed with SIGKILL"
	case x.Lost && x.ShimSignal != 0:
		how = "the engine's whole scope was killed (its shim too, by " + SignalName(x.ShimSignal) + ")"
	case x.Lost && x.LostWhy == "":
		how = "engine's shim lost: its scope is stopped"
	case x.Lost && x.LostWhy == Vanished:
		how = Vanished
	case x.Lost:
		how = "engine's shim lost (" + x.LostWhy + "): its scope is stopped"
	case ws.Exited():
		how = fmt.Sprintf("exited with status %d", ws.ExitStatus())
	case ws.Signaled():
		how = "killed by " + SignalName(ws.Signal())
		if ws.CoreDump() {
			how += " (core dumped)"
		}
	}
	switch reason {
	case crash.OutOfMemory:
		return fmt.Sprintf("out of memory: %s, %d OOM kill(s) in the scope", how, x.OOMKills)
	case crash.CUDAError, crash.DriverXID:
		return fmt.Sprintf("GPU fault: %q; %s", r.fault, how)
	case crash.HealthCheck:
		n := len(r.failures)
		if r.byCanary {
			n = len(r.canaryFailures)
		}
		return fmt.Sprintf("health check failed %d times (%s); %s", n, r.lastProbe, how)
	case crash.StartFailure:
		return fmt.Sprintf("%s; %s", r.lastProbe, how)
	case crash.Stalled:
		return fmt.Sprintf("stalled: %s; %s", r.lastProbe, how)
	}
	return how
}
