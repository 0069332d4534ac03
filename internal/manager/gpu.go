package manager

import (
	"context"
	"fmt"
	"log/slog"
	"os/exec"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/llorch/pool-managerd/internal/gpu"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/safetext"
	"github.com/llorch/pool-managerd/internal/supervisor"
)

// xidRetry is how soon a failed XID watch is tried again.
const xidRetry = 30 * time.Second

// WatchXID routes NVML XID events to the pools on the GPU until ctx ends.
// It watches the GPUs of the pools configured now, again on a reload's; an
// NVML failure is logged (once while it lasts) and the watch tried again.
// Without NVML there is nothing to watch.
func (m *Manager) WatchXID(ctx context.Context) {
	if m.o.Inventory.Source != gpu.SourceNVML {
		return
	}
	lastErr := ""
	gpu.KeepWatchingXID(ctx, m.o.NVML(), m.poolGPUs, m.xidChanged, xidRetry, m.RouteXID, func(err error) {
		if err.Error() != lastErr {
			m.o.Log.Warn("not watching for GPU XID events (trying again every 30 s)", journal.Error, err.Error())
			lastErr = err.Error()
		}
	})
}

// poolGPUs are the UUIDs of every configured pool's GPUs.
func (m *Manager) poolGPUs() []string {
	m.mu.RLock()
	defer m.mu.RUnlock()
	var uuids []string
	for _, e := range m.pools {
		if e.cfg == nil {
			continue
		}
		gpus, _ := m.o.Inventory.Resolve(e.cfg.Devices)
		for _, g := range gpus {
			uuids = append(uuids, g.UUID)
		}
	}
	return uuids
}

// owner is a pool on a GPU.
type owner struct {
	id   string
	pool Pool
}

// poolsOn returns the pools on GPU uuid, those still draining after a
// reload removed them included.
func (m *Manager) poolsOn(uuid string) []owner {
	m.mu.RLock()
	defer m.mu.RUnlock()
	var out []owner
	for _, pools := range []map[string]*entry{m.pools, m.retiring} {
		for id, e := range pools {
			if e.cfg == nil {
				continue
			}
			gpus, _ := m.o.Inventory.Resolve(e.cfg.Devices)
			for _, g := range gpus {
				if strings.EqualFold(g.UUID, uuid) {
					out = append(out, owner{id, e.pool})
					break
				}
			}
		}
	}
	return out
}

// RouteXID gives an XID event to the pools that own the GPU now: a
// restart of each, or a hold of each while the GPU needs a reset, is lost
// or is not known to be usable, or nothing, as NVIDIA's catalog (and,
// where the XID's action is in its message, the driver) says.
func (m *Manager) RouteXID(uuid string, xid uint64) {
	owners := m.poolsOn(uuid)
	if len(owners) == 0 {
		m.o.Log.Warn("GPU XID event on a GPU no pool uses", journal.XID, xid, journal.GPU, uuid, journal.Error, gpu.ClassifyXID(xid).Meaning)
		return
	}
	pools := make([]Pool, len(owners))
	for i, o := range owners {
		pools[i] = o.pool
	}
	info, why := supervisor.RouteXIDInfo(uuid, gpu.ReadXID(m.o.NVML(), uuid, xid), pools)
	switch info.Action {
	case gpu.XIDIgnore:
		level := slog.LevelInfo
		if info.Warn {
			level = slog.LevelWarn
		}
		m.o.Log.Log(m.ctx, level, fmt.Sprintf("GPU XID %d on %s: %s; nothing to do", xid, uuid, info.Meaning),
			journal.XID, xid, journal.GPU, uuid, journal.Hint, info.RemedyFor(uuid))
	case gpu.XIDReset, gpu.XIDLost, gpu.XIDHold:
		m.gpuUnhealthy(uuid, info, why)
	}
}

// gpuUnhealthy holds every pool on a GPU that needs a reset, is lost or
// is not known to be usable,
// says so once, critically, runs GPUResetCommand for a reset, and watches
// NVML until the GPU is usable again.
func (m *Manager) gpuUnhealthy(uuid string, info gpu.XIDInfo, why string) {
	m.mu.Lock()
	watching := m.unhealthy[uuid]
	m.unhealthy[uuid] = true
	cmd := m.cfg.Manager.Inventory.GPUResetCommand
	m.mu.Unlock()
	m.o.Metrics.GPUUnhealthy.WithLabelValues(uuid, info.Action.String()).Set(1)
	m.o.Metrics.Touch()
	m.o.Log.Log(m.ctx, journal.LevelCritical, why+": its pools are held, not restarted, until the GPU is usable again or AllowRestart",
		journal.GPU, uuid, journal.XID, info.XID, journal.Hint, info.RemedyFor(uuid))
	if watching {
		return
	}
	if len(cmd) > 0 && info.Action == gpu.XIDReset {
		go m.resetGPU(uuid, cmd)
	}
	go m.watchUsable(uuid)
}

// watchUsable asks NVML whether a held GPU is usable again, and when it
// is, lifts the hold of its pools.
func (m *Manager) watchUsable(uuid string) {
	wait := m.o.GPUFirstCheck
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-time.After(wait):
		}
		wait = m.o.GPUCheckEvery
		if ok, _, err := gpu.Usable(m.o.NVML(), uuid); err != nil || !ok {
			continue
		}
		m.mu.Lock()
		delete(m.unhealthy, uuid)
		m.mu.Unlock()
		owners := m.poolsOn(uuid)
		m.o.Metrics.GPUUnhealthy.DeletePartialMatch(prometheus.Labels{"gpu_uuid": uuid})
		m.o.Metrics.Touch()
		m.o.Log.Info("GPU "+uuid+" is usable again: its pools may start", journal.GPU, uuid)
		for _, o := range owners {
			o.pool.GPUUsable(uuid)
		}
		return
	}
}

// resetGPU runs GPUResetCommand for a GPU that needs a reset, once no pool
// on it runs an engine, and journals what came of it.
func (m *Manager) resetGPU(uuid string, command []string) {
	deadline := time.Now().Add(m.o.GPUResetWait)
	for {
		running := ""
		for _, o := range m.poolsOn(uuid) {
			if o.pool.Snapshot().Live {
				running = o.id
			}
		}
		if running == "" {
			break
		}
		if time.Now().After(deadline) {
			m.o.Log.Error("GPUResetCommand not run: a pool still runs an engine on the GPU", journal.GPU, uuid, journal.PoolID, running)
			return
		}
		select {
		case <-m.ctx.Done():
			return
		case <-time.After(100 * time.Millisecond):
		}
	}
	argv := resetArgv(command, uuid)
	ctx, cancel := context.WithTimeout(m.ctx, m.o.GPUResetTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, argv[0], argv[1:]...).CombinedOutput()
	tail := safetext.Bound(strings.TrimSpace(string(out)))
	if err != nil {
		m.o.Log.Error("GPUResetCommand failed: "+strings.Join(argv, " "), journal.GPU, uuid, journal.Error, err.Error(), journal.Output, tail)
		return
	}
	m.o.Log.Warn("GPUResetCommand ran: "+strings.Join(argv, " "), journal.GPU, uuid, journal.Output, tail)
}

// resetArgv is GPUResetCommand for GPU uuid: %g stands for the UUID;
// without one, the UUID is the last argument.
func resetArgv(command []string, uuid string) []string {
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
	return argv
}
