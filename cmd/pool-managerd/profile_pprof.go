//go:build pprof

package main

import (
	"fmt"
	"net"
	"net/http"
	_ "net/http/pprof"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"runtime/trace"
)

// ProfileEnv names a directory where a build with the pprof tag writes the
// daemon's execution trace (trace.out) of its whole run and its block and
// mutex profiles when it stops, for make bench to find where the time
// goes; DIR/pprof.sock serves net/http/pprof meanwhile, for a CPU profile
// of one window (make bench takes the idle windows' and the storms').
const ProfileEnv = "POOL_MANAGERD_PROFILE"

func init() {
	profile = func() func() {
		dir := os.Getenv(ProfileEnv)
		if dir == "" {
			return func() {}
		}
		// Not passed on to what the daemon starts.
		os.Unsetenv(ProfileEnv)
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
		tr := open("trace.out")
		if tr != nil {
			trace.Start(tr)
		}
		os.Remove(filepath.Join(dir, "pprof.sock"))
		if l, err := net.Listen("unix", filepath.Join(dir, "pprof.sock")); err == nil {
			go http.Serve(l, nil)
		}
		return func() {
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
