package main

import (
	"encoding/json"
	"fmt"
	"net"
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
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
	"github.com/llorch/pool-managerd/internal/tools/load"
)

// bench is the one-pool setup: pool "bench" on GPU 0 restarts at once
// (the crash, restart, lease, drain, reload and staging figures); pool
// "dflt" on GPU 1 runs the default restart and health policy (crash to
// ready).
type bench struct {
	opts   Options
	dir    string
	sim    string
	daemon string
	conn   *dbus.Conn
	mgr    dbus.BusObject
	port   int // the bench pool's engine port
	// alonePort is where the engine runs alone, for references.
	alonePort int
	// bigModel is the staging figure's file (its name under models/).
	bigModel string
	// wakePort is the wake figure's pool's engine port.
	wakePort int
}

const (
	benchPool = "bench"
	dfltPool  = "dflt"
	// smallModel is the model both pools start with.
	smallModel = "m.gguf"
)

func freePort() int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	must(err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// inside runs in the sandbox (re-executed there by main).
func inside(opts Options) {
	rep := Report{Options: opts, Start: time.Now().UTC().Format(time.RFC3339)}
	var figs Figures
	b := &bench{
		opts: opts, sim: os.Getenv(sandbox.BinEnv("pool-engine-sim")), daemon: os.Getenv(sandbox.BinEnv("pool-managerd")),
		port: freePort(), alonePort: freePort(),
	}
	dir, err := os.MkdirTemp("", "bench-")
	must(err)
	b.dir = dir
	os.Chmod(dir, 0o755)
	for _, d := range []string{"pools.d", "models"} {
		must(os.MkdirAll(filepath.Join(dir, d), 0o755))
	}
	b.writeModel(smallModel, "bench")
	if opts.has("staging") {
		b.bigModel = "big.gguf"
		progress("writing the %d MB model file", opts.StageMB)
		b.writeBig(b.bigModel, int64(opts.StageMB)<<20)
	}
	if opts.has("ondemand") {
		// The cold start figure's pool on a GPU of its own, the group's
		// two on another, the sleeping pool on a fifth.
		b.writeManager(5)
		b.writeVLLMModel()
		// Ports of their own: two pools on one Port= are refused.
		ports := freePorts(4)
		for slices.Contains(ports, b.port) || slices.Contains(ports, b.alonePort) {
			ports = freePorts(4)
		}
		b.wakePort = ports[3]
		must(os.WriteFile(filepath.Join(dir, "pools.d", odPool+".pool"), b.odPoolFile("2", ports[0]), 0o644))
		must(os.WriteFile(filepath.Join(dir, "pools.d", swapPoolA+".pool"), b.swapPoolFile(ports[1]), 0o644))
		must(os.WriteFile(filepath.Join(dir, "pools.d", swapPoolB+".pool"), b.swapPoolFile(ports[2]), 0o644))
		must(os.WriteFile(filepath.Join(dir, "pools.d", wakePool+".pool"), b.wakePoolFile(b.wakePort), 0o644))
	} else {
		b.writeManager(2)
	}
	must(os.WriteFile(filepath.Join(dir, "pools.d", benchPool+".pool"), testpool.SimPoolFile(b.sim, "0", smallModel, b.port, `[Health]
IntervalSec=0.1
TimeoutSec=0.1
StartTimeoutSec=60
[Restart]
BackoffInitialSec=0.02
BackoffMinSec=0.02
BackoffMaxSec=0.02
JitterPercent=0
BreakerThreshold=1000
StormMaxRestarts=10000
`), 0o644))
	if opts.has("ready") {
		// The default policy: no [Health] and no [Restart] settings.
		must(os.WriteFile(filepath.Join(dir, "pools.d", dfltPool+".pool"), testpool.SimPoolFile(b.sim, "1", smallModel, freePort(), ""), 0o644))
	}
	if opts.Profile != "" {
		// The daemon records itself while it runs; it writes the
		// profiles when it stops, at the end.
		d := "/etc/systemd/system/pool-managerd.service.d"
		must(os.MkdirAll(d, 0o755))
		must(os.WriteFile(filepath.Join(d, "profile.conf"), []byte("[Service]\nEnvironment=POOL_MANAGERD_PROFILE="+opts.Profile+"\n"), 0o644))
		defer exec.Command("systemctl", "stop", "pool-managerd").Run()
	}
	must(testpool.InstallDaemon(".", b.daemon, dir))
	b.conn, err = dbus.ConnectSystemBus()
	must(err)
	b.mgr = b.conn.Object(bus.Name, bus.ManagerPath)
	if opts.Load > 0 {
		progress("load: %d CPU-bound processes in pool-managerd-engines.slice", opts.Load)
		stopLoad, err := load.Start(opts.Load)
		must(err)
		defer stopLoad()
	}
	cpuStart, err := load.ReadCPUTimes()
	must(err)
	weights := load.CPUWeights(b.daemonPID())
	onePool := opts.has("crash", "restart", "lease", "drain", "reload", "staging", "ready", "ondemand")
	if onePool {
		b.waitReady(benchPool)
		if opts.has("ready") {
			b.waitReady(dfltPool)
		}
		for r := range opts.Rounds {
			progress("round %d of %d", r+1, opts.Rounds)
			if opts.has("crash", "restart") {
				b.crashRound(r, &figs)
			}
			if opts.has("lease") {
				b.leaseRound(r, &figs)
			}
			if opts.has("drain") {
				b.drainRound(r, &figs)
			}
			if opts.has("reload") {
				b.reloadRound(r, &figs)
			}
			if opts.has("staging") {
				b.stagingRound(r, &figs)
			}
			if opts.has("ready") {
				b.readyRound(r, &figs)
			}
			if opts.has("ondemand") {
				b.coldRound(r, &figs)
				b.swapRound(r, &figs)
				b.wakeRound(r, b.wakePort, &figs)
			}
		}
	}
	if opts.has("scale", "storm") {
		exec.Command("sh", "-c", "systemctl stop pool-managerd 'pool-engine-*.scope'").Run()
		os.Remove(filepath.Join(dir, "models", b.bigModel))
		b.scale(&figs)
	}
	if opts.has("ondemand") {
		exec.Command("sh", "-c", "systemctl stop pool-managerd 'pool-engine-*.scope'").Run()
		b.idleScale(&figs)
	}
	rep.Figures = figs.list()
	rep.Seconds = time.Since(began).Seconds()
	cpuEnd, err := load.ReadCPUTimes()
	must(err)
	rep.Host = load.During(opts.Load, cpuStart, cpuEnd)
	rep.Host.Weights = weights
	out, err := json.MarshalIndent(rep, "", "  ")
	must(err)
	fmt.Println(string(out))
}

// writeManager writes pool-managerd.conf with n fake GPUs.
func (b *bench) writeManager(n int) {
	var inv strings.Builder
	for i := range n {
		fmt.Fprintf(&inv, "Device=%d GPU-8f2c1a70-0000-4000-8000-%012d /dev/nvidia%d\n", i, i, i)
	}
	must(os.WriteFile(filepath.Join(b.dir, "pool-managerd.conf"), []byte(fmt.Sprintf(`[Manager]
StateDir=%[1]s/state
RuntimeDir=%[1]s/run
CacheDir=%[1]s/cache
ModelsDir=%[1]s/models
MetricsTextfile=
[Inventory]
Backend=static
%[2]sControlDevice=/dev/nvidiactl
`, b.dir, inv.String())), 0o644))
}

// writeModel writes a small model whose content (and so digest) is its
// tag's.
func (b *bench) writeModel(name, tag string) string {
	p := filepath.Join(b.dir, "models", name)
	must(os.WriteFile(p, []byte("GGUF\x03\x00\x00\x00 "+tag+"\n"), 0o644))
	return p
}

// writeBig writes a model of size bytes (a GGUF magic, then data that is
// not all zeros: nothing may take a shortcut through it).
func (b *bench) writeBig(name string, size int64) {
	f, err := os.OpenFile(filepath.Join(b.dir, "models", name), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	must(err)
	defer f.Close()
	block := make([]byte, 1<<20)
	copy(block, "GGUF\x03\x00\x00\x00")
	x := uint64(0x9e3779b97f4a7c15)
	for i := 8; i+8 <= len(block); i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		for j := range 8 {
			block[i+j] = byte(x >> (8 * j))
		}
	}
	for written := int64(0); written < size; {
		n := min(int64(len(block)), size-written)
		_, err := f.Write(block[:n])
		must(err)
		written += n
		block[8] ^= 0xff // blocks differ
	}
}

// daemonPID is the daemon's main PID, as systemd knows it.
func (b *bench) daemonPID() int {
	var v dbus.Variant
	must(b.conn.Object("org.freedesktop.systemd1", "/org/freedesktop/systemd1/unit/pool_2dmanagerd_2eservice").Call(
		"org.freedesktop.DBus.Properties.Get", 0, "org.freedesktop.systemd1.Service", "MainPID").Store(&v))
	return int(v.Value().(uint32))
}

func (b *bench) pool(id string) dbus.BusObject { return b.conn.Object(bus.Name, api.PoolPath(id)) }

func (b *bench) get(id, name string) any {
	v, err := b.pool(id).GetProperty(bus.PoolIface + "." + name)
	must(err)
	return v.Value()
}

func (b *bench) waitReady(id string) {
	deadline := time.Now().Add(60 * time.Second)
	for b.get(id, "Ready") != true {
		if time.Now().After(deadline) {
			must(fmt.Errorf("pool %s not ready within 60 s: %v", id, b.get(id, "LastError")))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// journalEntries returns the daemon's journal entries since t that match
// (journalctl matches, e.g. MESSAGE_ID=...), waiting until there are at
// least want of them.
func journalEntries(since time.Time, want int, matches ...string) []map[string]any {
	deadline := time.Now().Add(10 * time.Second)
	for {
		args := append([]string{"-u", "pool-managerd", "-o", "json", "--no-pager", fmt.Sprintf("--since=@%d.%06d", since.Unix(), since.Nanosecond()/1000)}, matches...)
		out, err := exec.Command("journalctl", args...).Output()
		must(err)
		var es []map[string]any
		for _, line := range strings.Split(string(out), "\n") {
			var e map[string]any
			if json.Unmarshal([]byte(line), &e) == nil {
				es = append(es, e)
			}
		}
		if len(es) >= want || time.Now().After(deadline) {
			return es
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func field(e map[string]any, name string) int64 {
	n, _ := strconv.ParseInt(fmt.Sprint(e[name]), 10, 64)
	return n
}

// crashSamples is how many engines a crash round kills (and how many
// references it takes of each kind): with 100, a p99 is the second
// slowest, not the slowest, and one hiccup of the machine does not decide
// a round.
const crashSamples = 100

var (
	crashFig = Figure{Name: "crash detection", Unit: "ms", Basis: "p99",
		Reference: "systemd ActiveState change, SIGKILL of a service",
		Goal:      Goal{Text: "p99 ratio <= 1.2", Of: "ratio", AtMost: 1.2}}
	restartFig = Figure{Name: "restart overhead", Unit: "ms", Basis: "median",
		Reference: "systemd-run --scope /bin/true, as long after the last scope as a restart",
		Goal:      Goal{Text: "median ratio <= 1.0, worst < 1.3", Of: "ratio", AtMost: 1.0, WorstBelow: 1.3}}
)

// scopeRefs times systemd-run --scope /bin/true as a restart meets
// systemd: each run begins gap after the previous one, the time the
// restarts left between one scope and the next. How long systemd takes to
// make a scope depends on how long ago it made the last one (README,
// Figures): a restart always finds its engine's scope made long ago, so
// the reference waits as long. The runs back to back are given too.
func (b *bench) scopeRefs(r int, gap time.Duration) (after, hot []time.Duration) {
	run := func(name string) time.Duration {
		t0 := time.Now()
		if out, err := exec.Command("systemd-run", "--scope", "--quiet", "--unit="+name, "/bin/true").CombinedOutput(); err != nil {
			must(fmt.Errorf("systemd-run --scope: %v: %s", err, out))
		}
		return time.Since(t0)
	}
	for i := range crashSamples {
		time.Sleep(gap)
		after = append(after, run(fmt.Sprintf("bench-scope-%d-%d.scope", r, i)))
	}
	for i := range crashSamples {
		hot = append(hot, run(fmt.Sprintf("bench-hot-%d-%d.scope", r, i)))
	}
	return after, hot
}

// crashRound: SIGKILL of the engine -> Ready=false seen by a client,
// against SIGKILL of a transient service's main process -> its
// ActiveState change seen the same way. The restarts that follow give the
// restart overhead: the decision to start -> the engine running in its
// new scope (the daemon logs it as START_USEC), against systemd-run
// --scope /bin/true end to end.
func (b *bench) crashRound(r int, figs *Figures) {
	w := watch(b.conn, dbus.WithMatchPathNamespace(bus.ManagerPath))
	since := time.Now()
	var ours []time.Duration
	path := api.PoolPath(benchPool)
	for range crashSamples {
		b.waitReady(benchPool)
		pid := int(b.get(benchPool, "MainPID").(uint32))
		w.drain()
		t0 := time.Now()
		must(syscall.Kill(pid, syscall.SIGKILL))
		ours = append(ours, w.prop(path, "Ready", false, 30*time.Second).at.Sub(t0))
	}
	w.close()
	b.waitReady(benchPool)
	var restarts, gaps []time.Duration
	var last time.Time
	// Where a start's time went, as the daemon logs it beside START_USEC.
	phases := map[string]string{journal.StageUsec: "1 stage", journal.CheckUsec: "2 check GPUs", journal.ShimUsec: "3 shim fork+exec",
		journal.ScopeUsec: "4 scope created", journal.LeftoverUsec: "4a of which an earlier scope", journal.ExecUsec: "5 engine exec"}
	split := map[string][]float64{}
	for _, e := range journalEntries(since, crashSamples, "MESSAGE=engine process started", journal.PoolID+"="+benchPool) {
		took := time.Duration(field(e, journal.StartUsec)) * time.Microsecond
		restarts = append(restarts, took)
		// From one start's scope to the next one's decision, about.
		at := time.UnixMicro(field(e, "__REALTIME_TIMESTAMP"))
		if !last.IsZero() {
			gaps = append(gaps, at.Sub(last)-took)
		}
		last = at
		for f, name := range phases {
			if _, ok := e[f]; ok {
				split[name] = append(split[name], float64(field(e, f))/1000)
			}
		}
	}
	if len(restarts) == 0 {
		must(fmt.Errorf("no engine start was logged"))
	}

	if b.opts.has("crash") {
		// systemd sends unit change signals only to subscribers.
		systemd := b.conn.Object("org.freedesktop.systemd1", "/org/freedesktop/systemd1")
		must(systemd.Call("org.freedesktop.systemd1.Manager.Subscribe", 0).Err)
		w := watch(b.conn, dbus.WithMatchPathNamespace("/org/freedesktop/systemd1/unit"))
		var ref []time.Duration
		for i := range crashSamples {
			name := fmt.Sprintf("bench-ref-%d-%d.service", r, i)
			out, err := exec.Command("systemd-run", "--unit="+name, "--property=Restart=no", "sleep", "infinity").CombinedOutput()
			if err != nil {
				must(fmt.Errorf("systemd-run: %v: %s", err, out))
			}
			upath := dbus.ObjectPath("/org/freedesktop/systemd1/unit/" + api.PathEncode(name))
			var v dbus.Variant
			must(b.conn.Object("org.freedesktop.systemd1", upath).Call("org.freedesktop.DBus.Properties.Get", 0,
				"org.freedesktop.systemd1.Service", "MainPID").Store(&v))
			pid := v.Value().(uint32)
			w.drain()
			t0 := time.Now()
			must(syscall.Kill(int(pid), syscall.SIGKILL))
			ref = append(ref, w.prop(upath, "ActiveState", nil, 30*time.Second).at.Sub(t0))
			exec.Command("systemctl", "reset-failed", name).Run()
		}
		w.close()
		must(systemd.Call("org.freedesktop.systemd1.Manager.Unsubscribe", 0).Err)
		figs.add(crashFig, newRound(r, crashFig.Basis, msAll(ours), msAll(ref)))
	}

	if b.opts.has("restart") {
		gap := time.Duration(median(msAll(gaps)) * float64(time.Millisecond))
		scopes, hot := b.scopeRefs(r, gap)
		rd := newRound(r, restartFig.Basis, msAll(restarts), msAll(scopes))
		rd.Parts = map[string]float64{}
		for name, v := range split {
			rd.Parts[name] = median(v)
		}
		rd.Parts["reference back to back"] = median(msAll(hot))
		rd.Parts["reference gap (restarts' own)"] = median(msAll(gaps))
		figs.add(restartFig, rd)
	}
}

var leaseFig = Figure{Name: "lease call", Unit: "ms", Basis: "median", Reference: "Peer.Ping, same connection",
	Goal: Goal{Text: "median ratio <= 1.25", Of: "ratio", AtMost: 1.25}}

// leaseRound: AcquireLease and ReleaseLease round trips against Ping, in
// turn on one connection.
func (b *bench) leaseRound(r int, figs *Figures) {
	b.waitReady(benchPool)
	var lease, ping []time.Duration
	for range 400 {
		t0 := time.Now()
		var id string
		must(b.mgr.Call(bus.ManagerIface+".AcquireLease", 0, benchPool).Store(&id))
		t1 := time.Now()
		must(b.mgr.Call(bus.ManagerIface+".ReleaseLease", 0, id).Err)
		t2 := time.Now()
		must(b.mgr.Call("org.freedesktop.DBus.Peer.Ping", 0).Err)
		t3 := time.Now()
		lease = append(lease, t1.Sub(t0), t2.Sub(t1))
		ping = append(ping, t3.Sub(t2))
	}
	figs.add(leaseFig, newRound(r, leaseFig.Basis, msAll(lease), msAll(ping)))
}

var drainFig = Figure{Name: "drain completion, engine stop excluded", Unit: "ms", Basis: "p99",
	Reference: "engine stop (reported apart)", Goal: Goal{Text: "p99 < 2 ms", Of: "value", AtMost: 2}}

// drainRound: last ReleaseLease sent -> Drain reply, less the engine's
// stop (the last lease gone to its exit settled and its scope gone), which the
// daemon logs as ENGINE_STOP_USEC and the simulator makes short: what is
// left is the release's way in and the drain's reply's way out. Timed
// from the release's reply instead, the figure would take off the
// release reply's own way back, and a slower reply would make the drain
// look faster.
func (b *bench) drainRound(r int, figs *Figures) {
	const n = 15
	since := time.Now()
	var drains []time.Duration
	for range n {
		b.waitReady(benchPool)
		var id string
		must(b.mgr.Call(bus.ManagerIface+".AcquireLease", 0, benchPool).Store(&id))
		call := b.mgr.Go(bus.ManagerIface+".Drain", 0, nil, benchPool, uint64(30000))
		for b.get(benchPool, "Draining") != true {
			select {
			case <-call.Done:
				must(fmt.Errorf("drain ended before its lease was released: %v", call.Err))
			case <-time.After(time.Millisecond):
			}
		}
		t0 := time.Now()
		must(b.mgr.Call(bus.ManagerIface+".ReleaseLease", 0, id).Err)
		<-call.Done
		drains = append(drains, time.Since(t0))
		must(call.Err)
		must(b.mgr.Call(bus.ManagerIface+".Start", 0, benchPool).Err)
	}
	b.waitReady(benchPool)
	var stops []time.Duration
	for _, e := range journalEntries(since, n, "MESSAGE_ID="+string(journal.MsgDrainDone), journal.PoolID+"="+benchPool) {
		if e[journal.Outcome] == "drained" {
			stops = append(stops, time.Duration(field(e, journal.EngineStopUsec))*time.Microsecond)
		}
	}
	if len(stops) != len(drains) {
		must(fmt.Errorf("%d drains, %d logged", len(drains), len(stops)))
	}
	own := make([]time.Duration, len(drains))
	for i, d := range drains {
		own[i] = max(0, d-stops[i])
	}
	rd := newRound(r, drainFig.Basis, msAll(own), msAll(stops))
	rd.Ratio = 0 // the stop is apart, not a reference to beat
	figs.add(drainFig, rd)
}
