//go:build pprof

package main

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"runtime/trace"
)

// ProfileEnv names a directory where a build with the pprof tag writes the
// daemon's CPU profile (cpu.pprof) and execution trace (trace.out) of its
// whole run, for make bench to find where the time goes.
const ProfileEnv = "POOL_MANAGERD_PROFILE"

func init() {
	profile = func() func() {
		dir := os.Getenv(ProfileEnv)
		if dir == "" {
			return func() {}
		}
		open := func(name string) *os.File {
			f, err := os.OpenFile(filepath.Join(dir, name), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
			if err != nil {
				fmt.Fprintln(os.Stderr, "profile:", err)
				return nil
			}
			return f
		}
		// Blocked and waiting goroutines too: a Get that waits shows.
		runtime.SetBlockProfileRate(10000)
		runtime.SetMutexProfileFraction(10)
		cpu, tr := open("cpu.pprof"), open("trace.out")
		if cpu != nil {
			pprof.StartCPUProfile(cpu)
		}
		if tr != nil {
			trace.Start(tr)
		}
		return func() {
			if cpu != nil {
				pprof.StopCPUProfile()
				cpu.Close()
			}
			if tr != nil {
				trace.Stop()
				tr.Close()
			}
			for _, p := range []string{"block", "mutex"} {
				if f := open(p + ".pprof"); f != nil {
					pprof.Lookup(p).WriteTo(f, 0)
					f.Close()
				}
			}
		}
	}
}
