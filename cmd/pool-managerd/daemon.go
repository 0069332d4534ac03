package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"reflect"
	"runtime/debug"
	"strings"
	"sync"
	"syscall"
	"time"

	sddaemon "github.com/coreos/go-systemd/v22/daemon"
	sdjournal "github.com/coreos/go-systemd/v22/journal"
	"github.com/godbus/dbus/v5"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	slogjournal "github.com/systemd/slog-journal"
	"golang.org/x/sys/unix"

	"github.com/llorch/pool-managerd/internal/bus"
	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/engine"
	"github.com/llorch/pool-managerd/internal/gpu"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/manager"
	"github.com/llorch/pool-managerd/internal/metrics"
	"github.com/llorch/pool-managerd/internal/model"
	"github.com/llorch/pool-managerd/internal/safetext"
	"github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/witness"
)

// logger writes to the journal natively when stderr is a journal stream
// (the daemon runs as a unit), as plain text otherwise.
func logger(stderr io.Writer) *slog.Logger {
	if ok, _ := sdjournal.StderrIsJournalStream(); ok {
		if h, err := slogjournal.NewHandler(nil); err == nil {
			return slog.New(h)
		}
	}
	return slog.New(slog.NewTextHandler(stderr, nil))
}

// pool is one configured pool as the daemon runs it.
type pool struct {
	cfg    *config.Pool
	sup    *supervisor.Supervisor
	cancel context.CancelFunc
}

// daemonState is what the daemon keeps between configuration reloads.
type daemonState struct {
	ctx     context.Context
	dir     string
	log     *slog.Logger
	cfg     *config.Config
	inv     *gpu.Inventory
	rt      *engine.Runtime
	metrics *metrics.Set
	stager  *model.Stager
	mgr     *manager.Manager
	srv     *bus.Server

	mu    sync.Mutex
	pools map[string]*pool
	// unhealthy are the GPUs held for a reset, each watched until usable.
	unhealthy map[string]bool
	// changed wakes the status watcher after a reload, xidReload the XID
	// watcher.
	changed, xidReload chan struct{}
}

// newNVML is the host's NVML; tests put go-nvml's mocks in its place.
var newNVML = gpu.NewNVML

// daemon supervises every configured pool until SIGTERM or SIGINT. Engines
// keep running after it exits: they live in their own scopes.
func daemon(dir string, cfg *config.Config, stderr io.Writer) int {
	log := logger(stderr)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	inv, err := gpu.Load(cfg.Manager.Inventory, newNVML(), "")
	if err != nil {
		log.Error("GPU inventory: " + err.Error())
		return exitConfig
	}
	if inv.Fallback != nil {
		log.Warn("NVML unavailable, using the static inventory: " + inv.Fallback.Error())
	}
	exe, err := os.Executable()
	if err != nil {
		log.Error(err.Error())
		return 1
	}
	shimCmd, dedicated := engine.ShimCommand(exe)
	if !dedicated {
		log.Warn("pool-managerd-shim not found beside " + exe + " or at " + engine.ShimPath + ": engines start through the daemon's own binary, which is slower")
	}
	rt, err := engine.New(ctx, shimCmd)
	if err != nil {
		log.Error(err.Error())
		return 1
	}
	defer rt.Close()
	// systemd is the second witness of every exit; without it the shim's
	// word stands alone.
	if w, err := witness.New(ctx); err != nil {
		log.Error("systemd is no witness of engine exits", journal.Error, err.Error())
	} else {
		rt.Witness = w
		defer w.Close()
		go func() {
			<-w.Done()
			if ctx.Err() == nil {
				log.Error("systemd is no witness of engine exits any more", journal.Error, fmt.Sprint(w.Err()))
			}
		}()
	}
	reg := prometheus.NewRegistry()
	// go_goroutines, process_open_fds, process_resident_memory_bytes: what
	// a leak shows in first.
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	d := &daemonState{
		ctx: ctx, dir: dir, log: log, cfg: cfg, inv: inv, rt: rt,
		metrics:   metrics.New(reg),
		stager:    model.New(cfg.Manager.ModelsDir, filepath.Join(cfg.Manager.StateDir, "staged"), model.WithModelDirs(cfg.Manager.ModelDirs...)),
		mgr:       manager.New(),
		pools:     map[string]*pool{},
		unhealthy: map[string]bool{},
		changed:   make(chan struct{}, 1),
		xidReload: make(chan struct{}, 1),
	}
	for _, p := range cfg.Pools {
		np, err := d.newPool(p)
		if err != nil {
			log.Error(err.Error())
			return exitConfig
		}
		d.pools[p.ID] = np
		d.mgr.Put(np.sup)
	}

	conn, err := dbus.ConnectSystemBus()
	if err != nil {
		log.Error("connecting to the system bus: " + err.Error())
		return 1
	}
	defer conn.Close()
	// Engines a previous daemon left running are adopted, not restarted;
	// those of pools no longer configured are stopped.
	if stopped, err := rt.StopOrphans(ctx, d.mgr.IDs()); err != nil {
		log.Error("looking for engines of removed pools: " + err.Error())
	} else if len(stopped) > 0 {
		log.Info(fmt.Sprintf("stopped %d engine(s) of pools no longer configured: %v", len(stopped), stopped))
	}
	onBus := func(owner string) bool {
		var has bool
		return conn.BusObject().Call("org.freedesktop.DBus.NameHasOwner", 0, owner).Store(&has) == nil && has
	}
	// READY=1 comes once the configuration is loaded, running engines are
	// adopted and the bus name is ours; starts go on in the background
	// (the first start of a big model hashes it for minutes, longer than
	// systemd waits for readiness).
	for _, id := range d.mgr.IDs() {
		p := d.pools[id]
		adopted, err := p.sup.Adopt(ctx, onBus)
		if err != nil {
			log.Error(fmt.Sprintf("pool %s: %v", id, err), journal.PoolID, id)
		}
		if !adopted && p.cfg.AutoStart {
			go d.start(p)
		}
	}
	d.srv, err = bus.Serve(ctx, conn, d.mgr, log, cfg.Manager.AdminGroup)
	if err != nil {
		log.Error(err.Error())
		return 1
	}
	sddaemon.SdNotify(false, sddaemon.SdNotifyReady+"\nSTATUS="+d.status())
	go d.metrics.Export(ctx, reg, cfg.Manager.MetricsTextfile, cfg.Manager.MetricsInterval, cfg.Manager.MetricsListen, log)
	go d.keepStatus()
	go d.watchdog()
	go d.watchXID()
	go d.keepPruning()

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	for {
		select {
		case <-hup:
			d.reload()
		case <-ctx.Done():
			sddaemon.SdNotify(false, sddaemon.SdNotifyStopping)
			d.mu.Lock()
			for _, p := range d.pools {
				p.sup.Flush()
				p.cancel()
			}
			d.mu.Unlock()
			log.Info("stopping; engines keep running in their scopes")
			return exitOK
		}
	}
}

func (d *daemonState) newPool(p *config.Pool) (*pool, error) {
	c, err := supervisor.FromPool(p, &d.cfg.Manager, d.inv, d.stager)
	if err != nil {
		return nil, err
	}
	if d.inv.Source == gpu.SourceNVML {
		gpus, _ := d.inv.Resolve(p.Devices)
		c.Holders = supervisor.GPUHolders(d.inv, gpus, newNVML())
	}
	s := supervisor.New(c, d.rt, d.log, d.metrics)
	// Not d.ctx: the loop must outlive SIGTERM long enough to flush.
	ctx, cancel := context.WithCancel(context.Background())
	go s.Run(ctx)
	return &pool{cfg: p, sup: s, cancel: cancel}, nil
}

func (d *daemonState) start(p *pool) {
	if err := p.sup.Start(); err != nil {
		d.log.Error(fmt.Sprintf("pool %s did not start: %v", p.cfg.ID, err), journal.PoolID, p.cfg.ID)
	}
}

// reload re-reads the configuration (SIGHUP, systemctl reload): added
// pools start, removed pools are drained and stopped, changed pools are
// drained and started again on their new configuration. A bad
// configuration changes nothing.
func (d *daemonState) reload() {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	sddaemon.SdNotify(false, fmt.Sprintf("RELOADING=1\nMONOTONIC_USEC=%d", ts.Nano()/1000))
	defer sddaemon.SdNotify(false, sddaemon.SdNotifyReady+"\nSTATUS="+d.status())
	cfg, err := config.Load(d.dir)
	if err == nil && !reflect.DeepEqual(cfg.Manager, d.cfg.Manager) {
		err = fmt.Errorf("%s changed: [Manager] and [Inventory] settings take effect on a restart of the daemon", config.ManagerFile)
	}
	if err != nil {
		d.log.Error("configuration reload refused, the running configuration stays:\n" + err.Error())
		return
	}
	// Building the new pools adds their models; what is allowed in the
	// end is the running configuration's (the new one, unless refused).
	defer func() { d.stager.SetPoolModels(poolModels(d.cfg)) }()
	next := map[string]*config.Pool{}
	for _, p := range cfg.Pools {
		next[p.ID] = p
	}
	// Build the new supervisors first: a pool that cannot be set up
	// (an unknown GPU) refuses the whole reload.
	fresh := map[string]*pool{}
	for id, p := range next {
		if old, ok := d.pools[id]; ok && reflect.DeepEqual(old.cfg, p) {
			continue
		}
		np, err := d.newPool(p)
		if err != nil {
			for _, f := range fresh {
				f.cancel()
			}
			d.log.Error("configuration reload refused, the running configuration stays: " + err.Error())
			return
		}
		fresh[id] = np
	}
	drain := func(p *pool) {
		ctx, cancel := context.WithTimeout(d.ctx, 10*time.Minute)
		defer cancel()
		if _, err := p.sup.Drain(ctx, 30*time.Second); err != nil {
			d.log.Error(fmt.Sprintf("draining pool %s: %v", p.cfg.ID, err), journal.PoolID, p.cfg.ID)
		}
		p.cancel()
	}
	removed, added, changed := 0, 0, 0
	for id, old := range d.pools {
		if _, ok := next[id]; !ok {
			d.srv.RemovePool(id)
			d.mgr.Remove(id)
			drain(old)
			d.metrics.Forget(id)
			d.mu.Lock()
			delete(d.pools, id)
			d.mu.Unlock()
			removed++
		}
	}
	for id, np := range fresh {
		if old, ok := d.pools[id]; ok {
			drain(old)
			changed++
		} else {
			added++
		}
		d.mu.Lock()
		d.pools[id] = np
		d.mu.Unlock()
		d.mgr.Put(np.sup)
		if err := d.srv.PutPool(np.sup); err != nil {
			d.log.Error(fmt.Sprintf("publishing pool %s: %v", id, err), journal.PoolID, id)
		}
		if np.cfg.AutoStart {
			go d.start(np)
		}
	}
	d.cfg = cfg
	for _, c := range []chan struct{}{d.changed, d.xidReload} {
		select {
		case c <- struct{}{}:
		default:
		}
	}
	d.log.Info(fmt.Sprintf("configuration reloaded: %d pool(s) added, %d removed, %d changed", added, removed, changed))
	d.prune()
}

// poolModels are the Model= refs of the configuration's pool files: a bus
// ref equal to one of them may lie outside the model directories.
func poolModels(cfg *config.Config) []string {
	var refs []string
	for _, p := range cfg.Pools {
		refs = append(refs, p.Model)
	}
	return refs
}

// keepPruning removes staged models no pool uses, now and then: a reload
// leaves the old model staged (a rollback may want it back) and disks of
// model stores fill.
func (d *daemonState) keepPruning() {
	t := time.NewTicker(10 * time.Minute)
	defer t.Stop()
	for {
		select {
		case <-d.ctx.Done():
			return
		case <-t.C:
			d.prune()
		}
	}
}

// prune removes staged models that no pool's engine runs on. A pool
// between staging its model and starting its engine may lose the file in
// that moment; its start then fails and the restart stages it again.
func (d *daemonState) prune() {
	var keep []string
	for _, s := range d.mgr.Pools() {
		if p := s.Snapshot().StagedPath; p != "" {
			keep = append(keep, p)
		}
	}
	if err := d.stager.Prune(keep); err != nil {
		d.log.Warn("pruning staged models", journal.Error, err.Error())
	}
}

// status is the one-line state systemctl status shows.
func (d *daemonState) status() string {
	sups := d.mgr.Pools()
	count := map[lifecycle.State]int{}
	for _, s := range sups {
		count[s.Snapshot().State]++
	}
	out := fmt.Sprintf("%d/%d pools ready", count[lifecycle.Ready], len(sups))
	for _, st := range []lifecycle.State{lifecycle.Starting, lifecycle.Warming, lifecycle.Backoff, lifecycle.Failed, lifecycle.Draining, lifecycle.Stopped} {
		if n := count[st]; n > 0 {
			out += fmt.Sprintf(", %d %s", n, st)
		}
	}
	return out
}

// settleQuiet is how long every pool must have stayed settled (ready,
// stopped or failed) after a change of state before the daemon gives the
// memory of the burst back.
var settleQuiet = 2 * time.Second

// settled reports whether no pool is on its way somewhere: none starting,
// warming, in backoff or draining.
func (d *daemonState) settled() bool {
	for _, s := range d.mgr.Pools() {
		switch s.Snapshot().State {
		case lifecycle.Ready, lifecycle.Stopped, lifecycle.Failed:
		default:
			return false
		}
	}
	return true
}

// keepStatus sends STATUS= whenever it changes. It also gives memory back
// to the system once the pools have settled after a burst of changes (the
// start, a restart storm, a reload): the burst grew the goroutines' stacks
// and the heap, the daemon then idles for hours on a fraction of that,
// and the runtime on its own shrinks stacks only at a GC, by half each,
// and returns free heap slowly, while idle GCs are a minute or more apart.
// One forced GC and scavenge costs milliseconds, once per burst.
func (d *daemonState) keepStatus() {
	release := time.NewTimer(settleQuiet)
	release.Stop()
	defer release.Stop()
	wake := make(chan struct{}, 1)
	poke := func() {
		select {
		case wake <- struct{}{}:
		default:
		}
	}
	watch := func(ctx context.Context, s *supervisor.Supervisor) {
		last := s.Snapshot().State
		for {
			snap, err := s.Wait(ctx, func(p supervisor.Snapshot) bool { return p.State != last })
			if err != nil {
				return
			}
			last = snap.State
			poke()
		}
	}
	for {
		ctx, cancel := context.WithCancel(d.ctx)
		for _, s := range d.mgr.Pools() {
			go watch(ctx, s)
		}
		// A pool that changed before its watcher took its first look is
		// seen here.
		poke()
		last := ""
	loop:
		for {
			select {
			case <-d.ctx.Done():
				cancel()
				return
			case <-d.changed:
				poke()
				break loop
			case <-wake:
				if st := d.status(); st != last {
					sddaemon.SdNotify(false, "STATUS="+st)
					last = st
				}
				if d.settled() {
					release.Reset(settleQuiet)
				} else {
					release.Stop()
				}
			case <-release.C:
				debug.FreeOSMemory()
			}
		}
		cancel()
	}
}

// watchdog pets systemd's watchdog at half its interval, but only after
// every pool's loop has answered: a hung loop stops the petting and systemd
// restarts the daemon.
func (d *daemonState) watchdog() {
	every, err := sddaemon.SdWatchdogEnabled(false)
	if err != nil || every <= 0 {
		return
	}
	t := time.NewTicker(every / 2)
	defer t.Stop()
	for {
		select {
		case <-d.ctx.Done():
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(d.ctx, every/2)
		ok := true
		for _, s := range d.mgr.Pools() {
			if err := s.Ping(ctx); err != nil {
				d.log.Error("watchdog: " + err.Error())
				ok = false
				break
			}
		}
		cancel()
		if ok {
			sddaemon.SdNotify(false, sddaemon.SdNotifyWatchdog)
		}
	}
}

// watchXID routes NVML XID events to the pool owning the GPU. It watches
// the GPUs of the pools configured now, again on a reload's; an NVML
// failure is logged (once while it lasts) and the watch tried again.
func (d *daemonState) watchXID() {
	if d.inv.Source != gpu.SourceNVML {
		return
	}
	lastErr := ""
	gpu.KeepWatchingXID(d.ctx, newNVML(), d.poolGPUs, d.xidReload, 30*time.Second, d.routeXID, func(err error) {
		if err.Error() != lastErr {
			d.log.Warn("not watching for GPU XID events (trying again every 30 s): " + err.Error())
			lastErr = err.Error()
		}
	})
}

// poolGPUs are the UUIDs of every configured pool's GPUs.
func (d *daemonState) poolGPUs() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	var uuids []string
	for _, p := range d.pools {
		gpus, _ := d.inv.Resolve(p.cfg.Devices)
		for _, g := range gpus {
			uuids = append(uuids, g.UUID)
		}
	}
	return uuids
}

// poolsOn returns the pools on GPU uuid; d.mu is held.
func (d *daemonState) poolsOn(uuid string) []*pool {
	var out []*pool
	for _, p := range d.pools {
		gpus, _ := d.inv.Resolve(p.cfg.Devices)
		for _, g := range gpus {
			if strings.EqualFold(g.UUID, uuid) {
				out = append(out, p)
				break
			}
		}
	}
	return out
}

// routeXID gives an XID event to the pool that owns the GPU now.
func (d *daemonState) routeXID(uuid string, xid uint64) {
	d.mu.Lock()
	owners := d.poolsOn(uuid)
	d.mu.Unlock()
	if len(owners) == 0 {
		d.log.Warn("GPU XID event on a GPU no pool uses", journal.XID, xid, journal.GPU, uuid, journal.Error, gpu.ClassifyXID(xid).Meaning)
		return
	}
	sups := make([]*supervisor.Supervisor, len(owners))
	for i, p := range owners {
		sups[i] = p.sup
	}
	info, why := supervisor.RouteXID(uuid, xid, sups)
	switch info.Action {
	case gpu.XIDIgnore:
		d.log.Info(fmt.Sprintf("GPU XID %d on %s: %s; nothing to do", xid, uuid, info.Meaning), journal.XID, xid, journal.GPU, uuid)
	case gpu.XIDReset, gpu.XIDLost:
		d.gpuUnhealthy(uuid, info, why)
	}
}

// gpuResetWait bounds how long GPUResetCommand waits for the GPU's pools
// to stop; gpuResetTimeout how long the command may run.
var (
	gpuResetWait    = 2 * time.Minute
	gpuResetTimeout = 5 * time.Minute
)

// resetGPU runs GPUResetCommand for a GPU that needs a reset, once no pool
// on it runs an engine, and journals what came of it.
func (d *daemonState) resetGPU(uuid string, command []string) {
	deadline := time.Now().Add(gpuResetWait)
	for {
		running := ""
		d.mu.Lock()
		for _, p := range d.poolsOn(uuid) {
			if p.sup.Snapshot().Live {
				running = p.cfg.ID
			}
		}
		d.mu.Unlock()
		if running == "" {
			break
		}
		if time.Now().After(deadline) {
			d.log.Error("GPUResetCommand not run: pool "+running+" still runs an engine on the GPU", journal.GPU, uuid)
			return
		}
		select {
		case <-d.ctx.Done():
			return
		case <-time.After(100 * time.Millisecond):
		}
	}
	argv := make([]string, 0, len(command)+1)
	sub := false
	for _, a := range command {
		if strings.Contains(a, "%g") {
			a, sub = strings.ReplaceAll(a, "%g", uuid), true
		}
		argv = append(argv, a)
	}
	if !sub {
		argv = append(argv, uuid)
	}
	ctx, cancel := context.WithTimeout(d.ctx, gpuResetTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, argv[0], argv[1:]...).CombinedOutput()
	tail := safetext.Bound(strings.TrimSpace(string(out)))
	if err != nil {
		d.log.Error("GPUResetCommand failed: "+strings.Join(argv, " ")+": "+err.Error(), journal.GPU, uuid, journal.Error, tail)
		return
	}
	d.log.Warn("GPUResetCommand ran: "+strings.Join(argv, " "), journal.GPU, uuid, journal.Error, tail)
}

// How soon, then how often, a GPU held for a reset is asked whether it is
// usable again: the driver may set its recovery action a moment after the
// XID.
var (
	gpuFirstCheck = 5 * time.Second
	gpuCheckEvery = 30 * time.Second
)

// gpuUnhealthy holds every pool on a GPU that needs a reset or is lost,
// says so once, critically, and watches NVML until the GPU is usable
// again.
func (d *daemonState) gpuUnhealthy(uuid string, info gpu.XIDInfo, why string) {
	d.mu.Lock()
	watching := d.unhealthy[uuid]
	if !watching {
		d.unhealthy[uuid] = true
	}
	d.mu.Unlock()
	d.metrics.GPUUnhealthy.WithLabelValues(uuid, info.Action.String()).Set(1)
	d.metrics.Touch()
	d.log.Log(d.ctx, journal.LevelCritical, why+": its pools are held, not restarted, until the GPU is usable again or AllowRestart",
		journal.GPU, uuid, journal.XID, info.XID, journal.Hint, info.RemedyFor(uuid))
	if watching {
		return
	}
	if cmd := d.cfg.Manager.Inventory.GPUResetCommand; len(cmd) > 0 && info.Action == gpu.XIDReset {
		go d.resetGPU(uuid, cmd)
	}
	go func() {
		wait := gpuFirstCheck
		for {
			select {
			case <-d.ctx.Done():
				return
			case <-time.After(wait):
			}
			wait = gpuCheckEvery
			if ok, _, err := gpu.Usable(newNVML(), uuid); err != nil || !ok {
				continue
			}
			d.mu.Lock()
			delete(d.unhealthy, uuid)
			pools := d.poolsOn(uuid)
			d.mu.Unlock()
			d.metrics.GPUUnhealthy.DeletePartialMatch(prometheus.Labels{"gpu_uuid": uuid})
			d.metrics.Touch()
			d.log.Info("GPU "+uuid+" is usable again: its pools may start", journal.GPU, uuid)
			for _, p := range pools {
				p.sup.GPUUsable(uuid)
			}
			return
		}
	}()
}
