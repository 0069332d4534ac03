package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
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
	"github.com/llorch/pool-managerd/internal/manager"
	"github.com/llorch/pool-managerd/internal/metrics"
	"github.com/llorch/pool-managerd/internal/model"
	"github.com/llorch/pool-managerd/internal/users"
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

// newNVML is the host's NVML; tests put go-nvml's mocks in its place.
var newNVML = gpu.NewNVML

// How soon, then how often, a GPU held for a reset is asked whether it is
// usable again; tests ask sooner.
var (
	gpuFirstCheck = 5 * time.Second
	gpuCheckEvery = 30 * time.Second
)

// daemon supervises every configured pool until SIGTERM or SIGINT. Engines
// keep running after it exits: they live in their own scopes.
func daemon(dir string, cfg *config.Config, stderr io.Writer) int {
	log := logger(stderr)
	defer profile()()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	inv, err := gpu.Load(cfg.Manager.Inventory, newNVML(), "")
	if err != nil {
		log.Error("GPU inventory unusable", journal.Error, err.Error())
		return exitConfig
	}
	if inv.Fallback != nil {
		log.Warn("NVML unavailable, using the static inventory", journal.Error, inv.Fallback.Error())
	}
	exe, err := os.Executable()
	if err != nil {
		log.Error("finding the daemon's own binary", journal.Error, err.Error())
		return 1
	}
	shimCmd, dedicated := engine.ShimCommand(exe)
	if !dedicated {
		log.Warn("pool-managerd-shim not found beside " + exe + " or at " + engine.ShimPath + ": engines start through the daemon's own binary, which is slower")
	}
	rt, err := engine.New(ctx, shimCmd)
	if err != nil {
		log.Error("connecting to systemd", journal.Error, err.Error())
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
	set := metrics.New(reg)
	stager := model.New(cfg.Manager.ModelsDir, filepath.Join(cfg.Manager.StateDir, "staged"), model.WithModelDirs(cfg.Manager.ModelDirs...))
	// An older installation's staging directory was open to everyone.
	if err := stager.PrepareStageDir(); err != nil {
		log.Error("preparing the staging directory", journal.Error, err.Error())
	}
	mgr, err := manager.Open(ctx, cfg, manager.Options{
		Log: log, Metrics: set, Inventory: inv, Runtime: rt, NVML: newNVML,
		Users: users.Open(filepath.Join(cfg.Manager.StateDir, users.File), cfg.Manager.CacheDir,
			cfg.Manager.EngineUIDs.First, cfg.Manager.EngineUIDs.Last, config.EngineGroup),
		Stager:        stager,
		GPUFirstCheck: gpuFirstCheck, GPUCheckEvery: gpuCheckEvery,
	})
	if err != nil {
		log.Error("setting up the pools", journal.Error, err.Error())
		return exitConfig
	}

	conn, err := dbus.ConnectSystemBus()
	if err != nil {
		log.Error("connecting to the system bus", journal.Error, err.Error())
		return 1
	}
	defer conn.Close()
	// Engines a previous daemon left running are adopted, not restarted;
	// those of pools no longer configured are stopped.
	if stopped, err := rt.StopOrphans(ctx, mgr.IDs()); err != nil {
		log.Error("looking for engines of removed pools", journal.Error, err.Error())
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
	mgr.Adopt(ctx, onBus)
	srv, err := bus.Serve(ctx, conn, mgr, log, cfg.Manager.AdminGroup)
	if err != nil {
		log.Error("serving on the system bus", journal.Error, err.Error())
		return 1
	}
	mgr.SetPublisher(srv)
	srv.OnReload(reloading(mgr))
	sddaemon.SdNotify(false, sddaemon.SdNotifyReady+"\nSTATUS="+mgr.Status())
	go set.Export(ctx, reg, cfg.Manager.MetricsTextfile, cfg.Manager.MetricsInterval, cfg.Manager.MetricsListen, log)
	go mgr.KeepStatus(ctx, func(st string) { sddaemon.SdNotify(false, "STATUS="+st) })
	// The watchdog is petted at half its interval.
	if every, err := sddaemon.SdWatchdogEnabled(false); err == nil && every > 0 {
		go mgr.Watchdog(ctx, every/2, func() { sddaemon.SdNotify(false, sddaemon.SdNotifyWatchdog) })
	}
	go mgr.WatchXID(ctx)
	go mgr.WatchKernelXIDs(ctx)
	go mgr.KeepPruning(ctx)

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	for {
		select {
		case <-hup:
			reload(mgr, log)
		case <-ctx.Done():
			sddaemon.SdNotify(false, sddaemon.SdNotifyStopping)
			mgr.Close()
			log.Info("stopping; engines keep running in their scopes")
			return exitOK
		}
	}
}

// reload re-reads the configuration on SIGHUP and applies it, as the
// bus's ReloadConfig does (what systemctl reload runs): a bad
// configuration changes nothing; the manager journals the outcome.
func reload(mgr *manager.Manager, log *slog.Logger) {
	defer reloading(mgr)()()
	if warnings, err := mgr.ReloadConfig(); err == nil {
		log.Info(fmt.Sprintf("configuration reloaded on SIGHUP with %d warning(s)", len(warnings)))
	}
}

// reloading tells systemd that a configuration reload began; what it
// returns tells it that it ended.
func reloading(mgr *manager.Manager) func() func() {
	return func() func() {
		var ts unix.Timespec
		unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
		sddaemon.SdNotify(false, fmt.Sprintf("RELOADING=1\nMONOTONIC_USEC=%d", ts.Nano()/1000))
		return func() { sddaemon.SdNotify(false, sddaemon.SdNotifyReady+"\nSTATUS="+mgr.Status()) }
	}
}
