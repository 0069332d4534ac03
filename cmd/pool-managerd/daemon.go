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

	sdjournal "github.com/coreos/go-systemd/v22/journal"
	"github.com/prometheus/client_golang/prometheus"
	slogjournal "github.com/systemd/slog-journal"

	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/engine"
	"github.com/llorch/pool-managerd/internal/gpu"
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
		if cfg.Pools[i].AutoStart {
			if err := s.Start(); err != nil {
				log.Error(fmt.Sprintf("pool %s did not start: %v", c.Pool, err))
			}
		}
	}
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
	log.Info("stopping; engines keep running in their scopes")
	return exitOK
}
