// Command soak runs a bounded crash/restart soak of pool-managerd inside
// the project's sandbox: 1000 engine faults of every kind across four
// pools, with drains and reloads interleaved, and checks that every crash
// was counted once and that nothing leaks. Run it with make soak;
// load=N (SOAK_ARGS) runs N CPU-bound processes in the engines' slice for
// the whole soak, as the bench's load=N does for its rounds.
//
// A leak is judged on samples of the daemon at rest, every 100 faults from
// 500 to 1000 (after a warm-up of 200): its goroutines by the function each
// runs and the one that created it (from a goroutine profile, through
// pprofhook), its open fds by kind, its RSS and live heap. Only what grows
// across that window is a leak, so a probe that happens to be in flight,
// or a cache that fills once, is not.
package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	api "github.com/llorch/pool-managerd/dbus"
	"github.com/llorch/pool-managerd/internal/bus"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
	"github.com/llorch/pool-managerd/internal/tools/load"
	"github.com/llorch/pool-managerd/internal/tools/soak/pprofhook"
)

const (
	pools  = 4
	faults = 1000
	limit  = 8 * time.Minute
	// window is where leaks are judged: from the checkpoint at window
	// faults to the last.
	window = 500
	// samples are taken at rest at each checkpoint, spaced so that they
	// fall at different phases of the pools' 200 ms health probes (which
	// are aligned): a count is the least of them.
	samples = 5
	spacing = 130 * time.Millisecond
)

// checkpoints are the fault counts at which the daemon is sampled at rest:
// a warm-up baseline, then every 100 faults of the window.
var checkpoints = []int{200, 500, 600, 700, 800, 900, 1000}

// Growth beyond these over the window is a leak. Goroutines and fds: a
// count that wanders by ±1 cannot lift the fitted line by 3 (see Rising);
// one leaked per 100 faults lifts it by 5. Live heap: measured after a
// forced GC, so it moves only by what the daemon keeps (about 1.1 MiB, and
// within 0.07 MiB over the window in every run so far); 0.5 MiB is 1 KiB
// kept per fault. RSS: the runtime returns freed pages to the kernel
// lazily and a heap twice its live size (GOGC=100) is normal, so RSS moves
// by a MiB or two with no leak; 8 MiB is 16 KiB kept per fault, which the
// live heap catches long before.
const (
	countRise   = 3
	heapRiseMiB = 0.5
	rssRiseMiB  = 8
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

// crashCounts reads the daemon's crash counters by reason from its
// textfile.
func crashCounts(textfile string) map[string]float64 {
	f, err := os.Open(textfile)
	must(err)
	defer f.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(f)
	must(err)
	crashes := map[string]float64{}
	if f, ok := fams["pool_managerd_engine_crashes_total"]; ok {
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "reason" {
					crashes[l.GetValue()] += m.GetCounter().GetValue()
				}
			}
		}
	}
	return crashes
}

// atRest is the daemon sampled at rest after some faults.
type atRest struct {
	faults          int
	pid             int
	goroutines, fds map[string]float64
	// where each group of goroutines waits
	where           map[string]string
	rssMiB, heapMiB float64
	settled         time.Duration
}

// profiles is where the daemon's goroutine dump and heap profile at each
// checkpoint are kept, for go tool pprof -base when something grows.
const profiles = "build/soak"

func total(m map[string]float64) float64 {
	var n float64
	for _, v := range m {
		n += v
	}
	return n
}

// profiler asks the daemon's pprofhook.
type profiler string

func (p profiler) goroutines() (map[string]float64, map[string]string, error) {
	b, err := pprofhook.Ask(string(p), "goroutine")
	if err != nil {
		return nil, nil, fmt.Errorf("the daemon's goroutines: %w", err)
	}
	return Goroutines(b)
}

// liveHeapMiB is the daemon's heap right after a GC it is made to run.
func (p profiler) liveHeapMiB() (float64, error) {
	b, err := pprofhook.Ask(string(p), "heap")
	if err != nil {
		return 0, fmt.Errorf("the daemon's live heap: %w", err)
	}
	n, err := strconv.ParseFloat(strings.TrimSpace(string(b)), 64)
	if err != nil {
		return 0, fmt.Errorf("the daemon's live heap: %w", err)
	}
	return n / (1 << 20), nil
}

func rssMiB(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) == 3 && f[0] == "VmRSS:" {
			kb, err := strconv.ParseFloat(f[1], 64)
			return kb / 1024, err
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}

func daemonPID() (int, error) {
	out, err := sh("systemctl show -p MainPID --value pool-managerd")
	if err != nil {
		return 0, err
	}
	pid, err := strconv.Atoi(out)
	if err == nil && pid == 0 {
		err = errors.New("pool-managerd is not running")
	}
	return pid, err
}

const usage = `usage: soak [load=N]
  load=N  N CPU-bound processes in the engines' slice for the whole soak
          (default 0, at most 64)`

// parseArgs reads the soak's arguments: the load it runs under.
func parseArgs(args []string) (int, error) {
	n := 0
	for _, a := range args {
		k, v, ok := strings.Cut(a, "=")
		if !ok || k != "load" {
			return 0, fmt.Errorf("unknown argument %q\n%s", a, usage)
		}
		var err error
		if n, err = load.Parse(v); err != nil {
			return 0, fmt.Errorf("%v\n%s", err, usage)
		}
	}
	return n, nil
}

func inside(loadN int) {
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
CacheDir=%[1]s/cache
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
	// The daemon built by main serves its profiles where this drop-in
	// says; InstallDaemon reloads systemd before starting it.
	sock := filepath.Join(dir, "pprof.sock")
	must(os.MkdirAll("/etc/systemd/system/pool-managerd.service.d", 0o755))
	must(os.WriteFile("/etc/systemd/system/pool-managerd.service.d/soak-pprof.conf",
		[]byte("[Service]\nEnvironment="+pprofhook.Env+"="+sock+"\n"), 0o644))
	must(testpool.InstallDaemon(".", daemon, dir))
	if loadN > 0 {
		stopLoad, err := load.Start(loadN)
		must(err)
		// must exits without deferred calls: the sandbox's end stops
		// the load then.
		defer stopLoad()
	}
	cpuStart, err := load.ReadCPUTimes()
	must(err)
	prof := profiler(sock)
	conn, err := dbus.ConnectSystemBus()
	must(err)
	mgr := conn.Object(bus.Name, bus.ManagerPath)
	obj := func(i int) dbus.BusObject { return conn.Object(bus.Name, api.PoolPath(fmt.Sprintf("s%d", i))) }
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

	// poolsAtRest describes every pool, and says whether each is ready
	// with no operation under way and systemd has no job queued (a scope
	// starting or stopping).
	poolsAtRest := func() (string, bool) {
		var b strings.Builder
		rest := true
		for i := range pools {
			state, ready, op := prop(i, "State"), prop(i, "Ready"), prop(i, "Operation")
			fmt.Fprintf(&b, "s%d %v ready=%v op=%q pid=%v crashes=%v restarts=%v; ", i, state, ready, op,
				prop(i, "MainPID"), prop(i, "CrashCount"), prop(i, "RestartCount"))
			rest = rest && state == "ready" && ready == true && op == ""
		}
		jobs, err := sh("systemctl list-jobs --no-legend")
		if jobs = strings.TrimSpace(strings.TrimPrefix(jobs, "No jobs running.")); err != nil || jobs != "" {
			fmt.Fprintf(&b, "jobs: %s %v", jobs, err)
			rest = false
		}
		return b.String(), rest
	}
	// sample waits (at most 30 s) for the daemon to be at rest, and
	// samples it. At rest means every pool ready with no operation and no
	// systemd job queued, and nothing of it (state, engine PID, crash and
	// restart counts) changed across a second: longer than the restart
	// backoff (0.1 s), a health interval (0.2 s) and the 500 ms the daemon
	// waits for a shim's word once a scope vanishes. Samples taken while
	// anything changed are thrown away and taken again.
	sample := func(n int) (atRest, error) {
		t0 := time.Now()
		deadline := t0.Add(30 * time.Second)
		last := ""
		for {
			if time.Now().After(deadline) {
				return atRest{}, fmt.Errorf("the daemon not at rest after %d faults within 30 s: %s", n, last)
			}
			before, rest := poolsAtRest()
			last = before
			if !rest {
				time.Sleep(100 * time.Millisecond)
				continue
			}
			time.Sleep(time.Second)
			if now, _ := poolsAtRest(); now != before {
				continue
			}
			pid, err := daemonPID()
			if err != nil {
				return atRest{}, err
			}
			var gs, fs []map[string]float64
			var where map[string]string
			rss := 0.0
			for k := range samples {
				if k > 0 {
					time.Sleep(spacing)
				}
				g, w, err := prof.goroutines()
				if err != nil {
					return atRest{}, err
				}
				f, err := FDs(pid)
				if err != nil {
					return atRest{}, err
				}
				r, err := rssMiB(pid)
				if err != nil {
					return atRest{}, err
				}
				gs, fs, where = append(gs, g), append(fs, f), w
				if k == 0 || r < rss {
					rss = r
				}
			}
			if now, _ := poolsAtRest(); now != before {
				continue
			}
			heap, err := prof.liveHeapMiB()
			if err != nil {
				return atRest{}, err
			}
			hp, err := pprofhook.Ask(string(prof), "heapprofile")
			if err != nil {
				return atRest{}, err
			}
			dump, err := pprofhook.Ask(string(prof), "goroutine")
			if err != nil {
				return atRest{}, err
			}
			if err := os.WriteFile(filepath.Join(profiles, fmt.Sprintf("heap-%d.pb.gz", n)), hp, 0o644); err != nil {
				return atRest{}, err
			}
			if err := os.WriteFile(filepath.Join(profiles, fmt.Sprintf("goroutines-%d.txt", n)), dump, 0o644); err != nil {
				return atRest{}, err
			}
			return atRest{faults: n, pid: pid, goroutines: Least(gs), where: where, fds: Least(fs), rssMiB: rss, heapMiB: heap, settled: time.Since(t0)}, nil
		}
	}

	for i := range pools {
		must(waitReady(i, 0))
	}
	at0, err := sample(0)
	must(err)

	var injected sync.Map // reason -> *int64
	count := func(reason string) {
		v, _ := injected.LoadOrStore(reason, new(int64))
		atomic.AddInt64(v.(*int64), 1)
	}
	// done counts faults injected or about to be: a worker takes a number
	// before a fault and gives it back if the fault could not be made, so
	// a phase ends at exactly its checkpoint.
	var done atomic.Int64
	take := func(upTo int64) bool {
		for {
			n := done.Load()
			if n >= upTo {
				return false
			}
			if done.CompareAndSwap(n, n+1) {
				return true
			}
		}
	}
	var drains, reloads, stops atomic.Int64
	var round [pools]int // each pool's next fault, over phases
	start := time.Now()
	// phase injects faults into every pool until upTo were injected, and
	// returns once every pool is ready again.
	phase := func(upTo int64) error {
		var wg sync.WaitGroup
		errs := make(chan error, pools)
		for i := range pools {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for ; ; round[i]++ {
					n := round[i]
					if time.Since(start) > limit {
						errs <- fmt.Errorf("%d faults took longer than %s", done.Load(), limit)
						return
					}
					if !take(upTo) {
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
							done.Add(-1)
							continue
						}
					case "systemctl-stop":
						crashes, _ := prop(i, "CrashCount").(uint32)
						if out, err := sh("systemctl stop " + scope); err != nil {
							if strings.Contains(out, "not loaded") {
								done.Add(-1)
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
							done.Add(-1)
							continue
						}
						resp.Body.Close()
					}
					if k.reason != "" {
						count(k.reason)
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
		return <-errs
	}

	// POOL_SOAK_PLANT_LEAK=1 has the daemon leak a goroutine and an fd
	// every 100 faults, to show that the soak finds and names a leak.
	plant := os.Getenv("POOL_SOAK_PLANT_LEAK") == "1"
	var rests []atRest
	prev := 0
	for _, cp := range checkpoints {
		must(phase(int64(cp)))
		for n := prev / 100; plant && n < cp/100; n++ {
			_, err := pprofhook.Ask(sock, "leak")
			must(err)
		}
		prev = cp
		r, err := sample(cp)
		must(err)
		rests = append(rests, r)
	}
	took := time.Since(start)
	crashes := crashCounts(textfile)
	cpuEnd, err := load.ReadCPUTimes()
	must(err)
	fmt.Println(load.During(loadN, cpuStart, cpuEnd).Describe("for the whole soak"))

	fmt.Printf("faults injected: %d in %s (%d drains, %d reloads interleaved), 4 pools\n", done.Load(), took.Round(time.Second), drains.Load(), reloads.Load())
	fmt.Printf("  systemctl stop of a scope: %d, none counted as a crash, each started again\n", stops.Load())
	ok := true
	var reasons []string
	injected.Range(func(k, _ any) bool { reasons = append(reasons, k.(string)); return true })
	sort.Strings(reasons)
	for _, k := range reasons {
		v, _ := injected.Load(k)
		n := float64(atomic.LoadInt64(v.(*int64)))
		fmt.Printf("  %-14s injected %4.0f  counted %4.0f\n", k, n, crashes[k])
		if crashes[k] != n {
			ok = false
		}
	}
	if !report(at0, rests) {
		ok = false
	}
	fmt.Printf("profiles at each checkpoint in %s/ (what grew: go tool pprof -base %[1]s/heap-%[2]d.pb.gz %[1]s/heap-%[3]d.pb.gz)\n", profiles, window, faults)

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
	if !ok || done.Load() < faults {
		fmt.Println("SOAK FAILED")
		os.Exit(1)
	}
	fmt.Println("soak passed")
}

// report prints the daemon's figures at rest at each checkpoint and what
// grew across the window; it returns false if anything leaked.
func report(at0 atRest, rests []atRest) bool {
	ok := true
	fmt.Printf("daemon at rest after    %6d", at0.faults)
	for _, r := range rests {
		fmt.Printf(" %6d", r.faults)
	}
	fmt.Printf(" faults\n")
	row := func(name, format string, f func(atRest) float64) {
		fmt.Printf("  %-21s"+format, name, f(at0))
		for _, r := range rests {
			fmt.Printf(" "+format, f(r))
		}
		fmt.Println()
	}
	row("goroutines", "%6.0f", func(r atRest) float64 { return total(r.goroutines) })
	row("  kinds", "%6.0f", func(r atRest) float64 { return float64(len(r.goroutines)) })
	row("open fds", "%6.0f", func(r atRest) float64 { return total(r.fds) })
	row("RSS MiB", "%6.1f", func(r atRest) float64 { return r.rssMiB })
	row("live heap KiB", "%6.0f", func(r atRest) float64 { return r.heapMiB * 1024 })
	row("s to come to rest", "%6.1f", func(r atRest) float64 { return r.settled.Seconds() })
	for _, r := range rests {
		if r.pid != at0.pid {
			fmt.Printf("the daemon restarted: PID %d at start, %d after %d faults\n", at0.pid, r.pid, r.faults)
			ok = false
		}
	}

	var win []atRest
	for _, r := range rests {
		if r.faults >= window {
			win = append(win, r)
		}
	}
	points := func(f func(atRest) map[string]float64) []Point {
		var ps []Point
		for _, r := range win {
			ps = append(ps, Point{Faults: r.faults, Counts: f(r)})
		}
		return ps
	}
	judge := func(what string, ps []Point, minRise float64, unit string, name func(string) string, where map[string]string) {
		rises, err := Rising(ps, minRise)
		if err != nil {
			fmt.Println(err)
			ok = false
			return
		}
		first, last := ps[0].Faults, ps[len(ps)-1].Faults
		if len(rises) == 0 {
			if s, _ := Steepest(ps); s.Fitted > 0.005 {
				fmt.Printf("%s: none grows from %d to %d faults (tolerance %g%s; steepest %+.2f%s: %s)\n",
					what, first, last, minRise, unit, s.Fitted, unit, name(s.Key))
			} else {
				fmt.Printf("%s: none grows from %d to %d faults (tolerance %g%s; nothing rises)\n", what, first, last, minRise, unit)
			}
			return
		}
		ok = false
		fmt.Printf("LEAK: %s grows from %d to %d faults (tolerance %g%s):\n", what, first, last, minRise, unit)
		for _, r := range rises {
			fmt.Printf("  %+.2f%s fitted (%g -> %g): %s\n", r.Fitted, unit, r.First, r.Last, name(r.Key))
			if w, ok := where[r.Key]; ok {
				fmt.Printf("    most wait at:\n      %s\n", strings.ReplaceAll(w, "\n", "\n      "))
			}
		}
	}
	same := func(s string) string { return s }
	judge("goroutines by function and creator", points(func(r atRest) map[string]float64 { return r.goroutines }), countRise, "", Short, win[len(win)-1].where)
	judge("open fds by kind", points(func(r atRest) map[string]float64 { return r.fds }), countRise, "", same, nil)
	judge("live heap", points(func(r atRest) map[string]float64 { return map[string]float64{"after a forced GC": r.heapMiB} }), heapRiseMiB, " MiB", same, nil)
	judge("RSS", points(func(r atRest) map[string]float64 { return map[string]float64{"VmRSS": r.rssMiB} }), rssRiseMiB, " MiB", same, nil)
	return ok
}

// buildDaemon builds pool-managerd with pprofhook in it (an overlay adds
// a file importing it to package main; no file of the daemon changes), and
// the shim beside it, into a new directory, for the soak to read the
// daemon's goroutines by stack.
func buildDaemon() (string, error) {
	out, err := exec.Command("go", "list", "-f", "{{.Dir}}", "github.com/llorch/pool-managerd/cmd/pool-managerd").Output()
	if err != nil {
		return "", fmt.Errorf("finding the daemon's package: %w", err)
	}
	dir, err := os.MkdirTemp("", "soak-bin-")
	if err != nil {
		return "", err
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return dir, err
	}
	hook := filepath.Join(dir, "soak_pprofhook.go")
	if err := os.WriteFile(hook, []byte("package main\n\nimport _ \"github.com/llorch/pool-managerd/internal/tools/soak/pprofhook\"\n"), 0o644); err != nil {
		return dir, err
	}
	overlay := filepath.Join(dir, "overlay.json")
	o := fmt.Sprintf(`{"Replace":{%q:%q}}`, filepath.Join(strings.TrimSpace(string(out)), "zz_soak_pprofhook.go"), hook)
	if err := os.WriteFile(overlay, []byte(o), 0o644); err != nil {
		return dir, err
	}
	if out, err := exec.Command("go", "build", "-overlay", overlay, "-o", filepath.Join(dir, "pool-managerd"), "github.com/llorch/pool-managerd/cmd/pool-managerd").CombinedOutput(); err != nil {
		return dir, fmt.Errorf("building pool-managerd with pprofhook: %v: %s", err, out)
	}
	// The daemon starts engines through the shim beside it, as installed.
	if out, err := exec.Command("go", "build", "-o", filepath.Join(dir, "pool-managerd-shim"), "github.com/llorch/pool-managerd/cmd/pool-managerd-shim").CombinedOutput(); err != nil {
		return dir, fmt.Errorf("building pool-managerd-shim: %v: %s", err, out)
	}
	return dir, nil
}

func main() {
	loadN, err := parseArgs(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "soak:", err)
		os.Exit(2)
	}
	if sandbox.Inside() {
		inside(loadN)
		return
	}
	bin, err := buildDaemon()
	if err == nil {
		err = os.MkdirAll(profiles, 0o755)
	}
	var out string
	if err == nil {
		out, err = filepath.Abs(profiles)
	}
	if err == nil {
		os.Setenv(sandbox.BinEnv("pool-managerd"), filepath.Join(bin, "pool-managerd"))
		ctx, cancel := context.WithTimeout(context.Background(), limit+5*time.Minute)
		err = sandbox.RunSelf(ctx, sandbox.Options{Nodes: sandbox.GPUNodes(pools), Binds: []string{bin, out}, Prepare: [][]string{{"useradd", "--system", "pool-engine"}}},
			os.Stdout, "github.com/llorch/pool-managerd/cmd/pool-engine-sim")
		cancel()
	}
	if bin != "" {
		os.RemoveAll(bin)
	}
	must(err)
}
