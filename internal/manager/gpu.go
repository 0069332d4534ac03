package manager

import (
	"context"
	"fmt"
	"log/slog"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/llorch/pool-managerd/internal/engine"
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

// RouteXID gives an NVML XID event to the pools that own the GPU now: a
// restart of each, or a hold of each while the GPU needs a reset, is lost
// or is not known to be usable, or nothing, as NVIDIA's catalog (and,
// where the XID's action is in its message, the driver) says. A
// process-tied XID is not acted on here: NVML's event names no process,
// and only the kernel's line for the same fault (RouteKernelXID) ties it
// to a pool.
func (m *Manager) RouteXID(uuid string, xid uint64) {
	owners := m.poolsOn(uuid)
	if len(owners) == 0 {
		m.warn.Warn(xidNoPool, "GPU XID event on a GPU no pool uses", journal.XID, xid, journal.GPU, uuid, journal.Error, gpu.ClassifyXID(xid).Meaning)
		return
	}
	info := gpu.ReadXID(m.o.NVML(), uuid, xid)
	if info.ProcessTied {
		m.warn.Log(m.ctx, slog.LevelInfo, xidProcess, fmt.Sprintf("GPU XID %d on %s: %s; it acts only on the pool whose scope holds the process the kernel names", xid, uuid, info.Meaning),
			journal.XID, xid, journal.GPU, uuid)
		return
	}
	m.countXID(uuid, xid, tiedDevice)
	pools := make([]Pool, len(owners))
	for i, o := range owners {
		pools[i] = o.pool
	}
	info, why := supervisor.RouteXIDInfo(uuid, info, pools)
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

// Kinds of the rate-limited XID entries: anyone with a CUDA context can
// raise process-tied XIDs at will.
const (
	xidNoPool  = "xid_no_pool"
	xidProcess = "xid_process"
	xidForeign = "xid_foreign"
	xidFlood   = "xid_flood"
)

// Values of pool_managerd_gpu_xids_total's tied label.
const (
	tiedPool   = "pool"
	tiedNone   = "none"
	tiedDevice = "device"
)

func (m *Manager) countXID(uuid string, xid uint64, tied string) {
	if m.o.Metrics == nil {
		return
	}
	m.o.Metrics.GPUXIDs.WithLabelValues(uuid, strconv.FormatUint(xid, 10), tied).Inc()
	m.o.Metrics.Touch()
}

// Bounds of the kernel's XID lines routed: kernelXIDBurst at once, then
// kernelXIDRate a second. Anyone with a CUDA context can raise XIDs at
// will, and each costs an NVML query; the rest are journaled, rate-limited.
const (
	kernelXIDBurst = 100
	kernelXIDRate  = 20
)

// journalRetryFirst is how soon journalctl is run again after it ended;
// each failure in a row doubles it, up to xidRetry.
const journalRetryFirst = time.Second

// WatchKernelXIDs follows the kernel's journal entries for the driver's
// XID lines (they name the faulting process) and routes each until ctx
// ends. journalctl is run again when it ends; while it cannot read the
// journal, pool_managerd_kernel_log_readable is 0 and the reason is
// journaled once.
func (m *Manager) WatchKernelXIDs(ctx context.Context) {
	if m.o.Inventory.Source != gpu.SourceNVML {
		return
	}
	j := &gpu.KernelJournal{Command: m.o.Journalctl}
	bucket := tokens{burst: kernelXIDBurst, rate: kernelXIDRate}
	route := func(k gpu.KernelXID) {
		if !bucket.take(time.Now()) {
			m.warn.Warn(xidFlood, "kernel XID lines over the rate limit: not routed", journal.XID, k.XID, journal.PID, k.PID,
				journal.Error, "more than "+strconv.Itoa(kernelXIDRate)+" a second")
			return
		}
		m.RouteKernelXID(k)
	}
	lastErr, wait := "", journalRetryFirst
	for {
		started := time.Now()
		err := j.Follow(ctx, func() {
			m.setKernelLogReadable(true)
			if lastErr != "" {
				m.o.Log.Info("reading XIDs from the kernel's journal entries again")
				lastErr = ""
			}
		}, route)
		if ctx.Err() != nil {
			return
		}
		m.setKernelLogReadable(false)
		if err.Error() != lastErr {
			m.o.Log.Warn("not reading XIDs from the kernel's journal entries: process-tied XIDs restart no pool (trying again)", journal.Error, err.Error())
			lastErr = err.Error()
		}
		if time.Since(started) > xidRetry {
			wait = journalRetryFirst
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		wait = min(2*wait, xidRetry)
	}
}

func (m *Manager) setKernelLogReadable(ok bool) {
	if m.o.Metrics == nil {
		return
	}
	v := 0.0
	if ok {
		v = 1
	}
	m.o.Metrics.KernelLogReadable.WithLabelValues().Set(v)
	m.o.Metrics.Touch()
}

// tokens is a token bucket: burst at once, rate a second.
type tokens struct {
	burst, rate float64
	have        float64
	last        time.Time
}

func (b *tokens) take(now time.Time) bool {
	if b.last.IsZero() {
		b.have = b.burst
	} else {
		b.have = min(b.burst, b.have+now.Sub(b.last).Seconds()*b.rate)
	}
	b.last = now
	if b.have < 1 {
		return false
	}
	b.have--
	return true
}

// RouteKernelXID acts on a process-tied XID the kernel names: only the
// pool whose scope holds the process (and that uses the GPU) acts; one of
// a process in no pool's scope (another user's, or gone) is journaled,
// rate-limited, and counted for the GPU. Device-level XIDs are NVML's
// (RouteXID): acting on both would act twice.
func (m *Manager) RouteKernelXID(k gpu.KernelXID) {
	info := gpu.ClassifyXID(k.XID)
	if !info.ProcessTied {
		return
	}
	uuid, err := gpu.UUIDByPCI(m.o.NVML(), k.PCI)
	if err != nil {
		uuid = "PCI:" + k.PCI
	}
	o, ok := m.poolOfProcess(uuid, k.PID)
	if !ok {
		m.countXID(uuid, k.XID, tiedNone)
		m.warn.Warn(xidForeign, "GPU XID of a process in no pool's scope: no pool acts", journal.XID, k.XID, journal.GPU, uuid,
			journal.PID, k.PID, journal.Error, info.Meaning)
		return
	}
	m.countXID(uuid, k.XID, tiedPool)
	if info.Action != gpu.XIDRestart {
		m.o.Log.Info(fmt.Sprintf("GPU XID %d on %s: %s; nothing to do", k.XID, uuid, info.Meaning),
			journal.XID, k.XID, journal.GPU, uuid, journal.PoolID, o.id, journal.PID, k.PID)
		return
	}
	o.pool.XID(uuid, k.XID)
}

// poolOfProcess is the pool on GPU uuid whose scope holds process pid,
// told by the process's cgroup path from the root (read once); a process
// that is gone, or pid 0 (none named), is in none.
func (m *Manager) poolOfProcess(uuid string, pid int) (owner, bool) {
	if pid <= 0 {
		return owner{}, false
	}
	cg, err := gpu.CgroupOf(m.o.ProcRoot, pid)
	if err != nil {
		return owner{}, false
	}
	for _, o := range m.poolsOn(uuid) {
		if scope := engine.ScopeCgroup(o.id); cg == scope || strings.HasPrefix(cg, scope+"/") {
			return o, true
		}
	}
	return owner{}, false
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
