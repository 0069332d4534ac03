package main

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/godbus/dbus/v5"

	api "github.com/llorch/pool-managerd/dbus"
	"github.com/llorch/pool-managerd/internal/bus"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// odPool goes idle after a second unused and starts on a lease.
const odPool = "od"

// odPoolFile is the cold start figure's pool: IdleStopSec= at its least,
// health probed as the bench pool's.
func (b *bench) odPoolFile(device string, port int) []byte {
	return testpool.SimPoolFile(b.sim, device, smallModel, port, `[Pool]
IdleStopSec=1
StartOnLease=yes
[Health]
IntervalSec=0.1
TimeoutSec=0.1
StartTimeoutSec=60
`)
}

var coldFig = Figure{Name: "cold start on a lease", Unit: "ms", Basis: "median",
	Reference: "the engine alone, start to healthy",
	Goal:      Goal{Text: "overhead < 30 ms", Of: "overhead", AtMost: 30}}

// coldSamples is how many starts on a lease a round takes: each waits
// for the pool to go idle again (IdleStopSec=1).
const coldSamples = 10

// waitIdle waits until the pool is idle with its engine gone: a lease
// then meets no idle stop still under way.
func (b *bench) waitIdle(id string, d time.Duration) {
	deadline := time.Now().Add(d)
	for b.get(id, "State") != "idle" || b.get(id, "Live") != false {
		if time.Now().After(deadline) {
			must(fmt.Errorf("pool %s not idle within %s: %v (%v)", id, d, b.get(id, "State"), b.get(id, "LastError")))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// coldRound: AcquireLease on an idle pool with StartOnLease=yes until it
// answers (the lease granted once the engine is healthy), against the
// engine started by hand until /health answers, in turn.
func (b *bench) coldRound(r int, figs *Figures) {
	w := watch(b.conn, dbus.WithMatchPathNamespace(bus.ManagerPath))
	defer w.close()
	path := api.PoolPath(odPool)
	model := filepath.Join(b.dir, "models", smallModel)
	var ours, alone []time.Duration
	var leaving, running, healthy []float64
	for range coldSamples {
		b.waitIdle(odPool, time.Minute)
		w.drain()
		t0 := time.Now()
		var id string
		must(b.mgr.Call(bus.ManagerIface+".AcquireLease", 0, odPool).Store(&id))
		took := time.Since(t0)
		var left, live time.Time
		w.until(path, 10*time.Second, "Ready=true after a lease", func(c change) bool {
			if left.IsZero() && c.has("State", "starting") {
				left = c.at
			}
			if live.IsZero() && c.has("Live", true) {
				live = c.at
			}
			return c.has("Ready", true)
		})
		must(b.mgr.Call(bus.ManagerIface+".ReleaseLease", 0, id).Err)
		a := b.engineAlone(model)
		ours, alone = append(ours, took), append(alone, a)
		if !left.IsZero() && !live.IsZero() {
			leaving = append(leaving, ms(left.Sub(t0)))
			running = append(running, ms(live.Sub(left)))
			healthy = append(healthy, ms(t0.Add(took).Sub(live)))
		}
	}
	rd := overheadRound(r, ours, alone)
	rd.Parts = map[string]float64{"1 idle -> starting": median(leaving), "2 engine running (Live=true)": median(running),
		"3 lease granted": median(healthy), "engine alone": median(msAll(alone))}
	figs.add(coldFig, rd)
}

// idlePools of the 64 go idle; the others run throughout.
const idlePools = 60

var (
	idleRSSFig = Figure{Name: "64 pools, 60 idle: daemon RSS", Unit: "MiB", Basis: "value",
		Reference: "64 pools running, same daemon, same round",
		Goal:      Goal{Text: "ratio <= 1.0 (no worse)", Of: "ratio", AtMost: 1.0}}
	idleCPUFig = Figure{Name: "64 pools, 60 idle: daemon CPU", Unit: "% of a core", Basis: "value",
		Reference: "64 pools running, same daemon, same round",
		Goal:      Goal{Text: "ratio <= 1.0 (no worse)", Of: "ratio", AtMost: 1.0}}
)

// idleScale runs 64 simulator pools, 60 of them with IdleStopSec=1 and
// StartOnLease=yes. Each round: a lease on each of the 60 starts them
// and keeps them up, and the daemon's CPU over an idle window and its
// RSS are read (the reference: 64 running); then the leases go, the 60
// go idle, and the same is read again (ours).
func (b *bench) idleScale(figs *Figures) {
	progress("64 pools, 60 on demand: starting")
	b.writeManager(scalePools)
	for _, p := range append([]string{benchPool, dfltPool}, onDemandPools...) {
		os.Remove(filepath.Join(b.dir, "pools.d", p+".pool"))
	}
	ports := freePorts(scalePools)
	for i := range scalePools {
		// As the scale figure's: nothing opens a breaker.
		more := "[Health]\nIntervalSec=5\nTimeoutSec=2\n[Restart]\nBackoffInitialSec=1\nBackoffMaxSec=1\nJitterPercent=10\nBreakerThreshold=1000\nStormMaxRestarts=10000\n"
		if i >= scalePools-idlePools {
			more += "[Pool]\nIdleStopSec=1\nStartOnLease=yes\n"
		}
		// Ports the kernel found free (other sandboxes on the host share
		// its network: a fixed port of theirs would hold a start).
		must(os.WriteFile(filepath.Join(b.dir, "pools.d", scalePool(i)+".pool"),
			testpool.SimPoolFile(b.sim, strconv.Itoa(i), smallModel, ports[i], more), 0o644))
	}
	out, err := exec.Command("systemctl", "restart", "pool-managerd").CombinedOutput()
	if err != nil {
		// Why the daemon refused (its configuration check, say).
		log, _ := exec.Command("journalctl", "-u", "pool-managerd", "-n", "20", "--no-pager", "-o", "cat").CombinedOutput()
		must(fmt.Errorf("restart: %v: %s\n%s", err, out, log))
	}
	defer exec.Command("sh", "-c", "systemctl stop pool-managerd 'pool-engine-*.scope'").Run()
	var v dbus.Variant
	must(b.conn.Object("org.freedesktop.systemd1", "/org/freedesktop/systemd1/unit/pool_2dmanagerd_2eservice").Call(
		"org.freedesktop.DBus.Properties.Get", 0, "org.freedesktop.systemd1.Service", "MainPID").Store(&v))
	pid := int(v.Value().(uint32))
	// The 60 start with the daemon and go idle a second later; a lease
	// then starts them.
	for i := range scalePools {
		if i < scalePools-idlePools {
			b.waitReadyWithin(scalePool(i), 2*time.Minute)
		} else {
			b.waitIdle(scalePool(i), 2*time.Minute)
		}
	}
	// measure reads the daemon's CPU share over the idle window, then
	// its RSS.
	measure := func() (cpu, rss, anon float64) {
		time.Sleep(time.Second) // the starts or stops just made settle
		c0, _ := cpuTime(pid)
		t0 := time.Now()
		time.Sleep(time.Duration(b.opts.IdleSec) * time.Second)
		c1, _ := cpuTime(pid)
		return float64(c1-c0) / float64(time.Since(t0)) * 100, rssMiB(pid, "VmRSS:"), rssMiB(pid, "RssAnon:")
	}
	for r := range b.opts.Rounds {
		progress("64 pools, 60 on demand: round %d of %d", r+1, b.opts.Rounds)
		// The reference: every pool up, 60 of them held by a lease.
		leases := make([]string, idlePools)
		var wg sync.WaitGroup
		errs := make(chan error, idlePools)
		for i := range idlePools {
			wg.Go(func() {
				if err := b.mgr.Call(bus.ManagerIface+".AcquireLease", 0, scalePool(scalePools-idlePools+i)).Store(&leases[i]); err != nil {
					errs <- fmt.Errorf("lease on %s: %w", scalePool(scalePools-idlePools+i), err)
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			must(err)
		}
		refCPU, refRSS, refAnon := measure()
		for _, id := range leases {
			must(b.mgr.Call(bus.ManagerIface+".ReleaseLease", 0, id).Err)
		}
		for i := range idlePools {
			b.waitIdle(scalePool(scalePools-idlePools+i), time.Minute)
		}
		cpu, rss, anon := measure()
		figs.add(idleCPUFig, newRound(r, idleCPUFig.Basis, []float64{cpu}, []float64{refCPU}))
		rd := newRound(r, idleRSSFig.Basis, []float64{rss}, []float64{refRSS})
		rd.Parts = map[string]float64{"anonymous, 60 idle": anon, "anonymous, 64 running": refAnon}
		figs.add(idleRSSFig, rd)
	}
}

// waitReadyWithin is waitReady with a bound of its own (64 pools start
// together).
func (b *bench) waitReadyWithin(id string, d time.Duration) {
	deadline := time.Now().Add(d)
	for {
		v, err := b.pool(id).GetProperty(bus.PoolIface + ".Ready")
		if err == nil && v.Value() == true {
			return
		}
		if time.Now().After(deadline) {
			must(fmt.Errorf("pool %s not ready within %s: %v", id, d, b.get(id, "LastError")))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// freePorts is n distinct ports free now: each listener is held until all
// are found, or the kernel could hand out one twice (two pools on one
// Port= are refused).
func freePorts(n int) []int {
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		must(err)
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports
}
