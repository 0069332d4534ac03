// Command soak runs a bounded crash/restart soak of pool-managerd inside
// the project's sandbox: 1000 engine faults of every kind across four
// pools, with drains and reloads interleaved, then checks that nothing
// leaked and every crash was counted once. Run it with make soak.
package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/llorch/pool-managerd/internal/bus"
	"github.com/llorch/pool-managerd/internal/sandbox"
	"github.com/llorch/pool-managerd/internal/testpool"
)

const (
	pools  = 4
	faults = 1000
	limit  = 8 * time.Minute
)

// kinds are the faults injected: the simulator's own, and what an operator
// does to a scope with systemctl (a kill is a crash; a stop is not, and is
// counted apart).
var kinds = []struct{ fault, reason string }{
	{"segv", "signal"}, {"exit:3", "exit_code"}, {"cuda", "cuda_error"}, {"hang-health", "health_check"}, {"oom", "out_of_memory"},
	{"systemctl-kill", "signal"}, {"systemctl-stop", ""},
}

func must(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "soak:", err)
		os.Exit(1)
	}
}

func sh(cmd string) (string, error) {
	c := exec.Command("sh", "-c", cmd)
	c.Dir = "/"
	out, err := c.CombinedOutput()
	if err != nil {
		err = fmt.Errorf("%s: %w: %s", cmd, err, out)
	}
	return strings.TrimSpace(string(out)), err
}

// daemonStats reads the daemon's own figures from its textfile.
// atRest is the daemon's open fds and goroutines at rest: the least of a
// few samples of the textfile (rewritten every second), for a probe in
// flight holds a goroutine and a socket for a moment; a leak stays in
// every sample.
func atRest(textfile string) (fds, goroutines float64) {
	fds, goroutines = math.Inf(1), math.Inf(1)
	for i := range 5 {
		if i > 0 {
			time.Sleep(1100 * time.Millisecond)
		}
		f, g, _, _ := daemonStats(textfile)
		fds, goroutines = min(fds, f), min(goroutines, g)
	}
	return fds, goroutines
}

func daemonStats(textfile string) (fds, goroutines, rssMiB float64, crashes map[string]float64) {
	f, err := os.Open(textfile)
	must(err)
	defer f.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(f)
	must(err)
	one := func(name string) float64 {
		if f, ok := fams[name]; ok && len(f.GetMetric()) > 0 {
			m := f.GetMetric()[0]
			if m.GetGauge() != nil {
				return m.GetGauge().GetValue()
			}
		}
		return -1
	}
	crashes = map[string]float64{}
	if f, ok := fams["pool_managerd_engine_crashes_total"]; ok {
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "reason" {
					crashes[l.GetValue()] += m.GetCounter().GetValue()
				}
			}
		}
	}
	return one("process_open_fds"), one("go_goroutines"), one("process_resident_memory_bytes") / (1 << 20), crashes
}

func inside() {
	sim := os.Getenv(sandbox.BinEnv("pool-engine-sim"))
	daemon := os.Getenv(sandbox.BinEnv("pool-managerd"))
	dir, err := os.MkdirTemp("", "soak-")
	must(err)
	os.Chmod(dir, 0o755)
	for _, d := range []string{"pools.d", "models", "metrics"} {
		must(os.MkdirAll(filepath.Join(dir, d), 0o755))
	}
	for _, m := range []string{"a.gguf", "b.gguf"} {
		must(os.WriteFile(filepath.Join(dir, "models", m), []byte("GGUF\x03\x00\x00\x00 "+m), 0o644))
	}
	var inv strings.Builder
	for i := range pools {
		fmt.Fprintf(&inv, "Device=%d GPU-8f2c1a70-0000-4000-8000-%012d /dev/nvidia%d\n", i, i, i)
	}
	textfile := filepath.Join(dir, "metrics", "pool-managerd.prom")
	must(os.WriteFile(filepath.Join(dir, "pool-managerd.conf"), []byte(fmt.Sprintf(`[Manager]
StateDir=%[1]s/state
RuntimeDir=%[1]s/run
ModelsDir=%[1]s/models
MetricsTextfile=%[2]s
MetricsIntervalSec=1
[Inventory]
Backend=static
%[3]sControlDevice=/dev/nvidiactl
`, dir, textfile, inv.String())), 0o644))
	for i := range pools {
		must(os.WriteFile(filepath.Join(dir, "pools.d", fmt.Sprintf("s%d.pool", i)), testpool.SimPoolFile(sim, strconv.Itoa(i), "a.gguf", 19500+i, `[Health]
IntervalSec=0.2
TimeoutSec=0.2
[Restart]
BackoffInitialSec=0.1
BackoffMinSec=0.1
BackoffMaxSec=0.1
JitterPercent=0
BreakerThreshold=1000
StormMaxRestarts=10000
[Scope]
MemoryMax=64M
`), 0o644))
	}
	must(testpool.InstallDaemon(".", daemon, dir))
	conn, err := dbus.ConnectSystemBus()
	must(err)
	mgr := conn.Object(bus.Name, bus.ManagerPath)
	obj := func(i int) dbus.BusObject { return conn.Object(bus.Name, bus.PoolPath(fmt.Sprintf("s%d", i))) }
	prop := func(i int, name string) any {
		v, err := obj(i).GetProperty(bus.PoolIface + "." + name)
		if err != nil {
			return nil
		}
		return v.Value()
	}
	waitReady := func(i int, notPID uint32) error {
		deadline := time.Now().Add(60 * time.Second)
		for {
			if prop(i, "Ready") == true && prop(i, "MainPID") != notPID {
				return nil
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("pool s%d not ready: %v %v", i, prop(i, "State"), prop(i, "LastError"))
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitState := func(i int, state string) error {
		deadline := time.Now().Add(60 * time.Second)
		for prop(i, "State") != state {
			if time.Now().After(deadline) {
				return fmt.Errorf("pool s%d not %s: %v %v", i, state, prop(i, "State"), prop(i, "LastError"))
			}
			time.Sleep(20 * time.Millisecond)
		}
		return nil
	}
	for i := range pools {
		must(waitReady(i, 0))
	}
	time.Sleep(2 * time.Second) // let the textfile catch up once
	fdStart, gStart := atRest(textfile)
	_, _, rssStart, _ := daemonStats(textfile)
	// Open fds and goroutines are compared with the start, when every pool
	// was ready as at the end. RSS is compared with its size after a
	// warm-up of 100 faults: caches and the heap find their size first.
	var rss0 float64
	var warm sync.Once
	warmUp := func() {
		warm.Do(func() {
			time.Sleep(1500 * time.Millisecond)
			_, _, rss0, _ = daemonStats(textfile)
		})
	}

	var injected sync.Map // reason -> *int64
	count := func(reason string) {
		v, _ := injected.LoadOrStore(reason, new(int64))
		atomic.AddInt64(v.(*int64), 1)
	}
	var total atomic.Int64
	var drains, reloads, stops atomic.Int64
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, pools)
	for i := range pools {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; ; n++ {
				if total.Load() >= faults || time.Since(start) > limit {
					return
				}
				// A pool may still be restarting from its last fault: Busy is
				// then the right answer, and the call is made again.
				retry := func(f func() error) error {
					for try := 0; ; try++ {
						err := f()
						var de dbus.Error
						if err == nil || try == 20 || !errors.As(err, &de) || de.Name != bus.ErrorPrefix+"Busy" {
							return err
						}
						if err := waitReady(i, 0); err != nil {
							return err
						}
						time.Sleep(100 * time.Millisecond)
					}
				}
				if n%50 == 25 {
					// A drain, then a start; or a reload between the models.
					if i%2 == 0 {
						if err := retry(func() error {
							return mgr.Call(bus.ManagerIface+".Drain", 0, fmt.Sprintf("s%d", i), uint64(5000)).Err
						}); err != nil {
							errs <- err
							return
						}
						if err := mgr.Call(bus.ManagerIface+".Start", 0, fmt.Sprintf("s%d", i)).Err; err != nil {
							errs <- err
							return
						}
						drains.Add(1)
					} else {
						m := []string{"a.gguf", "b.gguf"}[n/50%2]
						if err := retry(func() error {
							return mgr.Call(bus.ManagerIface+".Reload", 0, fmt.Sprintf("s%d", i), m, uint64(5000)).Err
						}); err != nil {
							errs <- err
							return
						}
						reloads.Add(1)
					}
					if err := waitReady(i, 0); err != nil {
						errs <- err
						return
					}
				}
				// Each fault hits a ready engine: one still restarting
				// from the last would take it for something else.
				if err := waitReady(i, 0); err != nil {
					errs <- err
					return
				}
				pid, _ := prop(i, "MainPID").(uint32)
				k := kinds[(n+i)%len(kinds)]
				scope := fmt.Sprintf("pool-engine-s%d.scope", i)
				switch k.fault {
				case "systemctl-kill":
					// Like a fault the engine did not take (it was
					// restarting), a scope not there is tried again.
					if _, err := sh("systemctl kill --signal=SIGKILL " + scope); err != nil {
						continue
					}
				case "systemctl-stop":
					crashes, _ := prop(i, "CrashCount").(uint32)
					if out, err := sh("systemctl stop " + scope); err != nil {
						if strings.Contains(out, "not loaded") {
							continue
						}
						errs <- err
						return
					}
					if err := waitState(i, "stopped"); err != nil {
						errs <- err
						return
					}
					if c, _ := prop(i, "CrashCount").(uint32); c != crashes {
						errs <- fmt.Errorf("pool s%d: an operator's stop was counted as a crash", i)
						return
					}
					if err := retry(func() error { return mgr.Call(bus.ManagerIface+".Start", 0, fmt.Sprintf("s%d", i)).Err }); err != nil {
						errs <- err
						return
					}
					stops.Add(1)
				default:
					resp, err := http.Post(fmt.Sprintf("http://127.0.0.1:%d/sim/fault?kind=%s", 19500+i, k.fault), "", nil)
					if err != nil {
						continue
					}
					resp.Body.Close()
				}
				if k.reason != "" {
					count(k.reason)
				}
				if total.Add(1) == 100 {
					warmUp()
				}
				if err := waitReady(i, pid); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		must(err)
	}
	took := time.Since(start)
	time.Sleep(3 * time.Second) // the textfile is rewritten every second
	fd1, g1 := atRest(textfile)
	_, _, rss1, crashes := daemonStats(textfile)

	fmt.Printf("faults injected: %d in %s (%d drains, %d reloads interleaved), 4 pools\n", total.Load(), took.Round(time.Second), drains.Load(), reloads.Load())
	fmt.Printf("  systemctl stop of a scope: %d, none counted as a crash, each started again\n", stops.Load())
	ok := true
	injected.Range(func(k, v any) bool {
		n := float64(atomic.LoadInt64(v.(*int64)))
		fmt.Printf("  %-14s injected %4.0f  counted %4.0f\n", k, n, crashes[k.(string)])
		if crashes[k.(string)] != n {
			ok = false
		}
		return true
	})
	fmt.Printf("daemon open fds: %.0f at start, %.0f after %d faults\n", fdStart, fd1, total.Load())
	fmt.Printf("daemon goroutines: %.0f at start, %.0f after\n", gStart, g1)
	fmt.Printf("daemon RSS: %.1f MiB at start, %.1f MiB after 100 faults, %.1f MiB after (%+.1f %% over the last %d)\n",
		rssStart, rss0, rss1, (rss1/rss0-1)*100, total.Load()-100)
	if fd1 > fdStart || g1 > gStart || rss1 > rss0*1.05 {
		ok = false
	}
	// Everything stopped: nothing of any engine is left.
	for i := range pools {
		must(mgr.Call(bus.ManagerIface+".Stop", 0, fmt.Sprintf("s%d", i)).Err)
	}
	scopes, _ := sh("systemctl list-units --no-legend 'pool-engine-*' | wc -l")
	procs, _ := sh("pgrep -c -x pool-engine-sim || true")
	records, _ := filepath.Glob(filepath.Join(dir, "run", "pools", "*.json"))
	leases := 0
	for i := range pools {
		if v, ok := prop(i, "ActiveLeases").(uint32); ok {
			leases += int(v)
		}
	}
	fmt.Printf("after stopping every pool: %s scopes, %s engine processes, %d runtime records, %d leases\n", scopes, procs, len(records), leases)
	if scopes != "0" || procs != "0" || len(records) != 0 || leases != 0 {
		ok = false
	}
	exec.Command("systemctl", "stop", "pool-managerd").Run()
	if !ok || total.Load() < faults {
		fmt.Println("SOAK FAILED")
		os.Exit(1)
	}
	fmt.Println("soak passed")
}

func main() {
	if sandbox.Inside() {
		inside()
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), limit+5*time.Minute)
	defer cancel()
	must(sandbox.RunSelf(ctx, sandbox.Options{Nodes: sandbox.GPUNodes(pools), Prepare: [][]string{{"useradd", "--system", "pool-engine"}}},
		os.Stdout, "github.com/llorch/pool-managerd/cmd/pool-managerd", "github.com/llorch/pool-managerd/cmd/pool-managerd-shim", "github.com/llorch/pool-managerd/cmd/pool-engine-sim"))
}
