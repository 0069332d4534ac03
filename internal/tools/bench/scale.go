package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/godbus/dbus/v5"

	api "github.com/llorch/pool-managerd/dbus"
	"github.com/llorch/pool-managerd/internal/bus"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// scalePools is how many simulator pools the scale figures run.
const scalePools = 64

var (
	rssFig = Figure{Name: "64 pools idle: daemon RSS", Unit: "MiB", Basis: "value",
		Goal: Goal{Text: "< 40 MiB", Of: "value", AtMost: 40}}
	cpuFig = Figure{Name: "64 pools idle: daemon CPU, 5 s probes", Unit: "% of a core", Basis: "value",
		Goal: Goal{Text: "< 0.5 %", Of: "value", AtMost: 0.5}}
	backFig = Figure{Name: "64 engines killed: all ready again", Unit: "ms", Basis: "last pool",
		Goal: Goal{Text: "report"}}
	stormFig = Figure{Name: "storm: Get p99 during 64 kills", Unit: "ms", Basis: "p99",
		Reference: "systemd's own property, same bus, same storm",
		Goal:      Goal{Text: "p99 ratio <= 1.0", Of: "ratio", AtMost: 1.0}}
)

func scalePool(i int) string { return fmt.Sprintf("p%02d", i) }

// scale runs 64 pools on fake GPUs. Each round: the daemon's CPU over an
// idle window of 5 s health probes and its RSS, then every engine killed
// at once (the storm) with a property read every 5 ms meanwhile, ours and
// systemd's in turn.
func (b *bench) scale(figs *Figures) {
	progress("64 pools: starting")
	b.writeManager(scalePools)
	for _, p := range append([]string{benchPool, dfltPool}, onDemandPools...) {
		os.Remove(filepath.Join(b.dir, "pools.d", p+".pool"))
	}
	for i := range scalePools {
		// The backoff stays at 1 s and nothing opens a breaker: every
		// round's storm is like the first.
		must(os.WriteFile(filepath.Join(b.dir, "pools.d", scalePool(i)+".pool"), testpool.SimPoolFile(b.sim, strconv.Itoa(i), smallModel, 19000+i, `[Health]
IntervalSec=5
TimeoutSec=2
[Restart]
BackoffInitialSec=1
BackoffMaxSec=1
JitterPercent=10
BreakerThreshold=1000
StormMaxRestarts=10000
`), 0o644))
	}
	out, err := exec.Command("systemctl", "restart", "pool-managerd").CombinedOutput()
	if err != nil {
		must(fmt.Errorf("restart: %v: %s", err, out))
	}
	defer exec.Command("sh", "-c", "systemctl stop pool-managerd 'pool-engine-*.scope'").Run()
	deadline := time.Now().Add(2 * time.Minute)
	for i := range scalePools {
		for {
			v, err := b.pool(scalePool(i)).GetProperty(bus.PoolIface + ".Ready")
			if err == nil && v.Value() == true {
				break
			}
			if time.Now().After(deadline) {
				must(fmt.Errorf("64 pools not ready within 2 minutes"))
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	pid := b.daemonPID()
	for r := range b.opts.Rounds {
		progress("64 pools: round %d of %d", r+1, b.opts.Rounds)
		if b.opts.has("scale") {
			// Let the last storm's restarts settle.
			time.Sleep(time.Second)
			c0, src := cpuTime(pid)
			t0 := time.Now()
			recorded := b.cpuProfile(fmt.Sprintf("idle-r%d", r+1), time.Duration(b.opts.IdleSec)*time.Second)
			time.Sleep(time.Duration(b.opts.IdleSec) * time.Second)
			c1, _ := cpuTime(pid)
			recorded()
			pct := float64(c1-c0) / float64(time.Since(t0)) * 100
			if r == 0 {
				progress("64 pools: the daemon's CPU time read from %s", src)
			}
			figs.add(cpuFig, newRound(r, cpuFig.Basis, []float64{pct}, nil))
			rd := newRound(r, rssFig.Basis, []float64{rssMiB(pid, "VmRSS:")}, nil)
			// The binary's pages, shared with every other copy of it,
			// against the daemon's own memory.
			rd.Parts = map[string]float64{"anonymous": rssMiB(pid, "RssAnon:"), "file": rssMiB(pid, "RssFile:")}
			figs.add(rssFig, rd)
		}
		if b.opts.has("storm") {
			b.storm(r, figs)
		}
	}
}

// cpuProfile takes the daemon's CPU profile of the next d as DIR/name.pprof
// when the bench runs with profile=DIR; wait returns once it is written.
func (b *bench) cpuProfile(name string, d time.Duration) (wait func()) {
	if b.opts.Profile == "" {
		return func() {}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		c := http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", filepath.Join(b.opts.Profile, "pprof.sock"))
		}}}
		resp, err := c.Get(fmt.Sprintf("http://daemon/debug/pprof/profile?seconds=%d", max(1, int(d.Seconds()))))
		if err != nil {
			progress("profile %s: %v", name, err)
			return
		}
		defer resp.Body.Close()
		f, err := os.Create(filepath.Join(b.opts.Profile, name+".pprof"))
		if err != nil {
			progress("profile %s: %v", name, err)
			return
		}
		defer f.Close()
		io.Copy(f, resp.Body)
	}()
	return func() { <-done }
}

// cpuTime is the daemon's CPU time: its cgroup's count (every thread, to
// the microsecond), else systemd's, else the process's own in clock ticks.
func cpuTime(pid int) (time.Duration, string) {
	if cg, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid)); err == nil {
		for _, l := range strings.Split(string(cg), "\n") {
			path, ok := strings.CutPrefix(l, "0::")
			if !ok {
				continue
			}
			// The unified hierarchy, alone or beside v1 controllers.
			for _, root := range []string{"/sys/fs/cgroup", "/sys/fs/cgroup/unified"} {
				st, err := os.ReadFile(filepath.Join(root, path, "cpu.stat"))
				if err != nil {
					continue
				}
				for _, sl := range strings.Split(string(st), "\n") {
					if v, ok := strings.CutPrefix(sl, "usage_usec "); ok {
						if n, err := strconv.ParseInt(v, 10, 64); err == nil {
							return time.Duration(n) * time.Microsecond, "cgroup cpu.stat"
						}
					}
				}
			}
		}
	}
	out, err := exec.Command("systemctl", "show", "-P", "CPUUsageNSec", "pool-managerd").Output()
	if n, perr := strconv.ParseUint(strings.TrimSpace(string(out)), 10, 64); err == nil && perr == nil && n != ^uint64(0) {
		return time.Duration(n), "systemd CPUUsageNSec"
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	must(err)
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	ut, _ := strconv.Atoi(f[11])
	st, _ := strconv.Atoi(f[12])
	return time.Duration(ut+st) * 10 * time.Millisecond, "clock ticks" // USER_HZ is 100
}

// rssMiB reads one of the RSS lines of /proc/PID/status.
func rssMiB(pid int, line string) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	must(err)
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == line {
			kb, _ := strconv.Atoi(f[1])
			return float64(kb) / 1024
		}
	}
	return 0
}

// storm kills every engine at once. Each pool's way back is timed by its
// Ready=true signal (polling 64 pools would load the bus it measures),
// and a property is read every 5 ms all along, on a connection of its own
// as busctl's would be: ours and systemd's in turn.
func (b *bench) storm(r int, figs *Figures) {
	pids := make([]int, scalePools)
	index := map[dbus.ObjectPath]int{}
	for i := range scalePools {
		v, err := b.pool(scalePool(i)).GetProperty(bus.PoolIface + ".MainPID")
		must(err)
		pids[i] = int(v.Value().(uint32))
		index[api.PoolPath(scalePool(i))] = i
	}
	w := watch(b.conn, dbus.WithMatchPathNamespace(bus.ManagerPath))
	defer w.close()
	reader, err := dbus.ConnectSystemBus()
	must(err)
	defer reader.Close()
	stop := make(chan struct{})
	lat := make(chan [2][]time.Duration, 1)
	systemd := reader.Object("org.freedesktop.systemd1", "/org/freedesktop/systemd1")
	go func() {
		var l [2][]time.Duration
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-stop:
				lat <- l
				return
			case <-tick.C:
			}
			t := time.Now()
			var err error
			if i%2 == 0 {
				_, err = reader.Object(bus.Name, api.PoolPath(scalePool(i/2%scalePools))).GetProperty(bus.PoolIface + ".State")
			} else {
				_, err = systemd.GetProperty("org.freedesktop.systemd1.Manager.NNames")
			}
			if err == nil {
				l[i%2] = append(l[i%2], time.Since(t))
			}
		}
	}()
	w.drain()
	recorded := b.cpuProfile(fmt.Sprintf("storm-r%d", r+1), 3*time.Second)
	defer recorded()
	kill := time.Now()
	for _, p := range pids {
		syscall.Kill(p, syscall.SIGKILL)
	}
	back := make([]time.Duration, scalePools)
	down := make([]bool, scalePools)
	timeout := time.After(2 * time.Minute)
	for remaining := scalePools; remaining > 0; {
		select {
		case c := <-w.out:
			i, ok := index[c.path]
			if !ok || back[i] != 0 {
				continue
			}
			if c.has("Ready", false) {
				down[i] = true
			} else if down[i] && c.has("Ready", true) {
				back[i] = c.at.Sub(kill)
				remaining--
			}
		case <-timeout:
			close(stop)
			must(fmt.Errorf("pools not ready again within 2 minutes"))
		}
	}
	close(stop)
	l := <-lat
	figs.add(stormFig, newRound(r, stormFig.Basis, msAll(l[0]), msAll(l[1])))
	slices.Sort(back)
	br := Round{Index: r + 1, Samples: msAll(back), Median: ms(back[len(back)/2]), P99: ms(back[len(back)-1]), Value: ms(back[len(back)-1])}
	br.Parts = map[string]float64{"median pool": ms(back[len(back)/2]), "first": ms(back[0]), "spread, last - first": ms(back[len(back)-1] - back[0])}
	figs.add(backFig, br)
}
