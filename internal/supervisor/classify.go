package supervisor

import (
	"fmt"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/llorch/pool-managerd/internal/crash"
	"github.com/llorch/pool-managerd/internal/engine"
)

// classify adds to crash.Classify what only the supervisor knows: that it
// killed the engine for failing its probes or its start.
func classify(r *run, x *engine.Exit) (crash.Reason, bool) {
	if x.Lost {
		return crash.Signal, true
	}
	reason, ok := crash.Classify(crash.Exit{Status: x.Status, OOMKilled: x.OOMKills > 0, CUDAFault: r.fault != ""})
	switch r.stopping {
	case "health":
		if reason != crash.OutOfMemory && reason != crash.CUDAError {
			return crash.HealthCheck, true
		}
	case "start":
		return crash.StartFailure, true
	case "fault":
		if r.xid {
			return crash.DriverXID, true
		}
		return crash.CUDAError, true
	}
	return reason, ok
}

func signalName(sig syscall.Signal) string {
	if n := unix.SignalName(sig); n != "" {
		return n
	}
	return fmt.Sprintf("signal %d", int(sig))
}

func describe(reason crash.Reason, r *run, x *engine.Exit) string {
	ws := x.Status
	how := ""
	switch {
	case x.Lost && x.ShimSignal != 0:
		how = "the engine's whole scope was killed (its shim too, by " + signalName(x.ShimSignal) + ")"
	case x.Lost && x.LostWhy == "":
		how = "engine's shim lost: its scope is stopped"
	case x.Lost:
		how = "engine's shim lost (" + x.LostWhy + "): its scope is stopped"
	case ws.Exited():
		how = fmt.Sprintf("exited with status %d", ws.ExitStatus())
	case ws.Signaled():
		how = "killed by " + signalName(ws.Signal())
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
		return fmt.Sprintf("health check failed %d times (%v); %s", len(r.failures), r.lastProbe, how)
	case crash.StartFailure:
		return fmt.Sprintf("%v; %s", r.lastProbe, how)
	}
	return how
}
