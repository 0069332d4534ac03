package supervisor

import (
	"fmt"
	"path"
	"strings"
	"sync"

	"github.com/coreos/go-systemd/v22/unit"

	"github.com/llorch/pool-managerd/internal/engine"
	"github.com/llorch/pool-managerd/internal/gpu"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/model"
	"github.com/llorch/pool-managerd/internal/safetext"
)

// DefaultMemoryFactor is the default MemoryRequired=: the model's size
// times this (weights, plus a KV cache and the engine's own buffers).
const DefaultMemoryFactor = 1.2

// maxMemoryHolders bounds the holders a refusal names per GPU.
const maxMemoryHolders = 8

// GPUMemory reads the free memory of gpus and who uses it through NVML
// (lib nil: the host's).
func GPUMemory(gpus []gpu.GPU, lib gpu.NVML) func() ([]gpu.DeviceMemory, error) {
	return func() ([]gpu.DeviceMemory, error) {
		out := make([]gpu.DeviceMemory, 0, len(gpus))
		for _, g := range gpus {
			m, err := gpu.MemoryUse(lib, g.UUID, "/proc")
			if err != nil {
				return nil, err
			}
			out = append(out, m)
		}
		return out, nil
	}
}

// memoryPreflight looks at the memory before a scope is made, once a
// start was refused for want of it: a pool that waits for memory costs
// one NVML query a retry, not a scope. Where the pool's own scope holds
// the GPU (a leftover, freed by the precheck) it leaves the call to the
// precheck.
func (s *Supervisor) memoryPreflight(st model.Staged) error {
	if s.cfg.Memory == nil || s.memoryNeeded(st) == 0 {
		return nil
	}
	mem, err := s.cfg.Memory()
	if err != nil {
		return nil // the precheck reads it again and says so
	}
	scope := engine.ScopeCgroup(s.cfg.Pool)
	for _, d := range mem {
		for _, h := range d.Holders {
			if p, err := engine.OpenProcess(h.PID); err == nil {
				mine := p.Cgroup == scope
				p.Close()
				if mine {
					return nil
				}
			}
		}
	}
	return s.memoryFits(st, mem, nil, 0)
}

// memoryNeeded is what a start of st needs free over the pool's GPUs:
// MemoryRequired=, else the staged model's size times
// DefaultMemoryFactor; 0: not checked.
func (s *Supervisor) memoryNeeded(st model.Staged) uint64 {
	if s.cfg.MemoryRequired != nil {
		return *s.cfg.MemoryRequired
	}
	if st.Size <= 0 {
		return 0
	}
	return uint64(float64(st.Size) * DefaultMemoryFactor)
}

// unmeasured notes, once per inventory, that pools on it start without a
// memory fit.
var unmeasured sync.Map // *gpu.Inventory -> struct{}

// memoryFits refuses a start whose GPUs lack the memory the pool needs
// (each GPU its even share of it, as a model split over them takes),
// naming who holds it: ErrNoGPUMemory, which holds the pool without a
// crash until the memory is free. mem and merr are the GPUs' memory as
// read; the memory of the pool's own leftovers (in the scope's cgroup
// own), which die before the engine starts, counts as free. Where the
// memory is not known (the static inventory) or cannot be read, the
// engine starts: its own start will tell.
func (s *Supervisor) memoryFits(st model.Staged, mem []gpu.DeviceMemory, merr error, own uint64) error {
	need := s.memoryNeeded(st)
	if need == 0 {
		return nil
	}
	if s.cfg.Memory == nil {
		if s.cfg.Inventory != nil {
			if _, noted := unmeasured.LoadOrStore(s.cfg.Inventory, struct{}{}); !noted {
				s.log.Info("GPU memory fit not checked: the static inventory cannot tell free memory (NVML can)", journal.PoolID, s.cfg.Pool)
			}
		}
		return nil
	}
	if merr != nil {
		s.log.Warn("cannot read the free memory of the pool's GPUs", journal.PoolID, s.cfg.Pool, journal.Error, safetext.Bound(merr.Error()))
		return nil
	}
	if len(mem) == 0 {
		return nil
	}
	share := need / uint64(len(mem))
	if need%uint64(len(mem)) != 0 {
		share++
	}
	var short []string
	for _, d := range mem {
		free := d.Free
		for _, h := range d.Holders {
			if own != 0 && inCgroup(h.PID, own) {
				free += h.Used
			}
		}
		if free >= share {
			continue
		}
		what := fmt.Sprintf("GPU %s has %s free of %s", d.UUID, gpu.Bytes(free), gpu.Bytes(d.Total))
		if len(mem) > 1 {
			what += fmt.Sprintf(", its share is %s", gpu.Bytes(share))
		}
		short = append(short, what+heldBy(d.Holders, own))
	}
	if len(short) == 0 {
		return nil
	}
	return fmt.Errorf("the pool needs %s of GPU memory (%s): %s; it starts once the memory is free: %w",
		gpu.Bytes(need), s.neededFrom(st), strings.Join(short, "; "), lifecycle.ErrNoGPUMemory)
}

// neededFrom says where the figure came from.
func (s *Supervisor) neededFrom(st model.Staged) string {
	if s.cfg.MemoryRequired != nil {
		return "MemoryRequired="
	}
	return fmt.Sprintf("the model's %s times %.1f; set MemoryRequired= to change it", gpu.Bytes(uint64(st.Size)), DefaultMemoryFactor)
}

// heldBy names the processes using a GPU's memory, largest first: a
// process of one of the daemon's pools by its pool.
func heldBy(hs []gpu.MemoryHolder, own uint64) string {
	var names []string
	for i, h := range hs {
		if i == maxMemoryHolders {
			names = append(names, fmt.Sprintf("and %d more", len(hs)-i))
			break
		}
		if own != 0 && inCgroup(h.PID, own) {
			continue
		}
		used := "?"
		if h.Used > 0 {
			used = gpu.Bytes(h.Used)
		}
		cmd := safetext.Bound(h.Command)
		if cmd == "" {
			cmd = "?"
		}
		if pool, ok := poolOf(h.PID); ok {
			names = append(names, fmt.Sprintf("pool %s (pid %d, %s, %s)", pool, h.PID, cmd, used))
			continue
		}
		names = append(names, fmt.Sprintf("pid %d (%s, %s)", h.PID, cmd, used))
	}
	if len(names) == 0 {
		return ""
	}
	return ", used by " + strings.Join(names, ", ")
}

// inCgroup says whether pid runs in the cgroup whose id is id.
func inCgroup(pid int, id uint64) bool {
	p, err := engine.OpenProcess(pid)
	if err != nil {
		return false
	}
	defer p.Close()
	return p.CgroupID == id
}

// poolOf is the pool whose engine scope pid runs in: its cgroup must be
// a pool scope where the system manager makes them (a user's scope of
// the same name lives elsewhere).
func poolOf(pid int) (string, bool) {
	p, err := engine.OpenProcess(pid)
	if err != nil {
		return "", false
	}
	defer p.Close()
	dir, name := path.Split(p.Cgroup)
	if path.Clean(dir) != path.Dir(engine.ScopeCgroup("x")) {
		return "", false
	}
	esc, ok := strings.CutPrefix(name, "pool-engine-")
	if !ok {
		return "", false
	}
	esc, ok = strings.CutSuffix(esc, ".scope")
	if !ok || esc == "" {
		return "", false
	}
	id := unit.UnitNameUnescape(esc)
	if engine.UnitName(id) != name {
		return "", false
	}
	return id, true
}
