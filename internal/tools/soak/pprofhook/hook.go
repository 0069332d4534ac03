// Package pprofhook answers questions about the Go runtime of the process
// it is in on the Unix socket named by $POOL_SOAK_PPROF. make soak
// compiles it into its own build of the daemon (go build -overlay adds a
// blank import of it to package main), so it can count the daemon's
// goroutines by stack and weigh its live heap; the daemon that ships does
// not have it.
//
// One request per connection, one line: "goroutine" is answered with the
// goroutine profile at debug=2, "heap" with the bytes of live heap after a
// GC, "heapprofile" with the heap profile after a GC (for go tool pprof
// -base); "leak" leaks a goroutine and an fd on purpose, for the soak to show
// that it finds a leak (POOL_SOAK_PLANT_LEAK=1 make soak). Requests are
// served one at a time by the goroutine that accepts them, so the hook is
// one goroutine in every dump, however it is asked.
package pprofhook

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"runtime"
	"runtime/pprof"
	"strings"
	"time"
)

// Env names the socket.
const Env = "POOL_SOAK_PPROF"

func init() {
	// Unset, so that no process the daemon starts (its shims) takes the
	// socket over.
	if path := os.Getenv(Env); path != "" {
		os.Unsetenv(Env)
		// One sample per 16 KiB allocated, not 512 KiB: a leak of a few
		// hundred bytes per fault then shows in a profile's diff.
		runtime.MemProfileRate = 16 << 10
		if _, err := Serve(path); err != nil {
			fmt.Fprintln(os.Stderr, "pprofhook:", err)
		}
	}
}

// Serve answers on a Unix socket at path until the listener it returns is
// closed.
func Serve(path string) (net.Listener, error) {
	if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
		return nil, fmt.Errorf("pprofhook: %w", err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("pprofhook: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("pprofhook: %w", err)
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			answer(c)
		}
	}()
	return l, nil
}

func answer(c net.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return
	}
	switch q := strings.TrimSpace(line); q {
	case "goroutine":
		pprof.Lookup("goroutine").WriteTo(c, 2)
	case "heap":
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		fmt.Fprintf(c, "%d\n", m.HeapAlloc)
	case "heapprofile":
		runtime.GC()
		pprof.Lookup("heap").WriteTo(c, 0)
	case "leak":
		f, err := os.Open(os.DevNull)
		if err != nil {
			fmt.Fprintf(c, "error: %v\n", err)
			return
		}
		go planted(f)
		fmt.Fprintln(c, "leaked")
	default:
		fmt.Fprintf(c, "error: %q is not a question: ask goroutine, heap, heapprofile or leak\n", q)
	}
}

// planted is a leaked goroutine holding a leaked fd.
func planted(f *os.File) {
	defer f.Close()
	select {}
}

// Ask asks the hook listening at path a question and returns its answer.
func Ask(path, question string) ([]byte, error) {
	c, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		return nil, fmt.Errorf("pprofhook: %w", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintln(c, question); err != nil {
		return nil, fmt.Errorf("pprofhook: %w", err)
	}
	var b strings.Builder
	if _, err := bufio.NewReader(c).WriteTo(&b); err != nil {
		return nil, fmt.Errorf("pprofhook: %s: %w", question, err)
	}
	if a := b.String(); strings.HasPrefix(a, "error: ") {
		return nil, fmt.Errorf("pprofhook: %s", strings.TrimSpace(strings.TrimPrefix(a, "error: ")))
	}
	return []byte(b.String()), nil
}
