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
	slogjournal "github.com/systemd/slog-journal"

	"github.com/llorch/pool-managerd/internal/bus"
	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/engine"
	"github.com/llorch/pool-managerd/internal/gpu"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/manager"
	"github.com/llorch/pool-managerd/internal/metrics"
	"github.com/llorch/pool-managerd/internal/model"
	"github.com/llorch/pool-managerd/internal/supervisor"
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

// daemon supervises every configured pool until SIGTERM or SIGINT. Engines
// keep running after it exits: they live in their own scopes.
func daemon(cfg *config.Config, stderr io.Writer) int {
	log := logger(stderr)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	inv, err := gpu.Load(cfg.Manager.Inventory, nil, "")
	if err != nil {
		log.Error("GPU inventory: " + err.Error())
		return exitConfig
	}
	if inv.Fallback != nil {
		log.Warn("NVML unavailable, using the static inventory: " + inv.Fallback.Error())
	}
	stager := model.New(cfg.Manager.ModelsDir, filepath.Join(cfg.Manager.StateDir, "staged"))
	var sups []*supervisor.Supervisor
	var cfgs []supervisor.Config
	bad := false
	for _, p := range cfg.Pools {
		c, err := supervisor.FromPool(p, &cfg.Manager, inv, stager)
		if err != nil {
			log.Error(err.Error())
			bad = true
			continue
		}
		cfgs = append(cfgs, c)
	}
	if bad {
		return exitConfig
	}
	exe, err := os.Executable()
	if err != nil {
		log.Error(err.Error())
		return 1
	}
	rt, err := engine.New(ctx, []string{exe})
	if err != nil {
		log.Error(err.Error())
		return 1
	}
	defer rt.Close()
	m := metrics.New(prometheus.NewRegistry())
	byUUID := map[string]*supervisor.Supervisor{}
	var uuids []string
	for i, c := range cfgs {
		s := supervisor.New(c, rt, log, m)
		sups = append(sups, s)
		go s.Run(ctx)
		gpus, _ := inv.Resolve(cfg.Pools[i].Devices)
		for _, g := range gpus {
			byUUID[g.UUID] = s
			uuids = append(uuids, g.UUID)
		}
	}
	mgr := manager.New(sups...)
	conn, err := dbus.ConnectSystemBus()
	if err != nil {
		log.Error("connecting to the system bus: " + err.Error())
		return 1
	}
	defer conn.Close()
	// Engines a previous daemon left running are adopted, not restarted;
	// those of pools no longer configured are stopped.
	ids := mgr.IDs()
	if stopped, err := rt.StopOrphans(ctx, ids); err != nil {
		log.Error("looking for engines of removed pools: " + err.Error())
	} else if len(stopped) > 0 {
		log.Info(fmt.Sprintf("stopped %d engine(s) of pools no longer configured: %v", len(stopped), stopped))
	}
	onBus := func(owner string) bool {
		var has bool
		return conn.BusObject().Call("org.freedesktop.DBus.NameHasOwner", 0, owner).Store(&has) == nil && has
	}
	// READY=1 comes once every pool has been started (or has failed to,
	// with a reason) and the bus name is ours.
	for i, s := range sups {
		adopted, err := s.Adopt(ctx, onBus)
		if err != nil {
			log.Error(fmt.Sprintf("pool %s: %v", cfgs[i].Pool, err), journal.PoolID, cfgs[i].Pool)
		}
		if !adopted && cfg.Pools[i].AutoStart {
			if err := s.Start(); err != nil {
				log.Error(fmt.Sprintf("pool %s did not start: %v", cfgs[i].Pool, err), journal.PoolID, cfgs[i].Pool)
			}
		}
	}
	if _, err := bus.Serve(ctx, conn, mgr, log, cfg.Manager.AdminGroup); err != nil {
		log.Error(err.Error())
		return 1
	}
	sddaemon.SdNotify(false, sddaemon.SdNotifyReady+"\nSTATUS="+status(sups))
	go keepStatus(ctx, sups)
	go watchdog(ctx, sups, log)
	if inv.Source == gpu.SourceNVML && len(uuids) > 0 {
		go func() {
			err := gpu.WatchXID(ctx, nil, uuids, func(uuid string, xid uint64) {
				if s := byUUID[uuid]; s != nil {
					s.XID(uuid, xid)
				}
			})
			if err != nil {
				log.Warn("not watching for GPU XID events: " + err.Error())
			}
		}()
	}
	log.Info(fmt.Sprintf("supervising %d pool(s)", len(sups)))
	<-ctx.Done()
	sddaemon.SdNotify(false, sddaemon.SdNotifyStopping)
	log.Info("stopping; engines keep running in their scopes")
	return exitOK
}

// status is the one-line state systemctl status shows.
func status(sups []*supervisor.Supervisor) string {
	count := map[string]int{}
	for _, s := range sups {
		count[s.Snapshot().State]++
	}
	out := fmt.Sprintf("%d/%d pools ready", count[supervisor.Ready], len(sups))
	for _, st := range []string{supervisor.Starting, supervisor.Backoff, supervisor.Failed, supervisor.Draining, supervisor.Stopped} {
		if n := count[st]; n > 0 {
			out += fmt.Sprintf(", %d %s", n, st)
		}
	}
	return out
}

// keepStatus sends STATUS= whenever it changes.
func keepStatus(ctx context.Context, sups []*supervisor.Supervisor) {
	changed := make(chan struct{}, 1)
	for _, s := range sups {
		go func() {
			last := s.Snapshot().State
			for {
				snap, err := s.Wait(ctx, func(p supervisor.Snapshot) bool { return p.State != last })
				if err != nil {
					return
				}
				last = snap.State
				select {
				case changed <- struct{}{}:
				default:
				}
			}
		}()
	}
	last := ""
	for {
		select {
		case <-ctx.Done():
			return
		case <-changed:
			if st := status(sups); st != last {
				sddaemon.SdNotify(false, "STATUS="+st)
				last = st
			}
		}
	}
}

// watchdog pets systemd's watchdog at half its interval, but only after
// every pool's loop has answered: a hung loop stops the petting and systemd
// restarts the daemon.
func watchdog(ctx context.Context, sups []*supervisor.Supervisor, log *slog.Logger) {
	every, err := sddaemon.SdWatchdogEnabled(false)
	if err != nil || every <= 0 {
		return
	}
	t := time.NewTicker(every / 2)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		pctx, cancel := context.WithTimeout(ctx, every/2)
		ok := true
		for _, s := range sups {
			if err := s.Ping(pctx); err != nil {
				log.Error("watchdog: " + err.Error())
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
