package supervisor

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/engine"
	"github.com/llorch/pool-managerd/internal/gpu"
	"github.com/llorch/pool-managerd/internal/model"
	"github.com/llorch/pool-managerd/internal/state"
)

// ModelStager is the daemon's model stager (*model.Stager), which checks
// every model against the rights of the engine's user (and of a bus
// caller who names one).
type ModelStager interface {
	Resolve(ref string, readers ...model.User) (model.Source, error)
	Digest(src model.Source) (string, error)
	Stage(ref, want string, engine model.User) (model.Staged, error)
	// AddPoolModels records refs that a pool file names as Model=: they
	// may lie outside the model directories.
	AddPoolModels(refs ...string)
	// Hashing says how far the hash of ref has come, while one runs.
	Hashing(ref string) (read, size int64, ok bool)
}

// engineStager is a ModelStager as one pool's engine user sees it.
type engineStager struct {
	s    ModelStager
	user func() (model.User, error)
}

// engine is the engine's credential, named so in messages; a user that
// cannot be had is the host's fault, not the ref's.
func (e engineStager) engine(ref string) (model.User, error) {
	u, err := e.user()
	if err != nil {
		return model.User{}, fmt.Errorf("model %q: %w", ref, err)
	}
	u.Role = "the engine's user"
	return u, nil
}

// Resolve checks ref for the callers first (a caller is told nothing of
// what it could not reach), then for the engine's user.
func (e engineStager) Resolve(ref string, callers ...model.User) (model.Source, error) {
	u, err := e.engine(ref)
	if err != nil {
		return model.Source{}, err
	}
	return e.s.Resolve(ref, append(callers[:len(callers):len(callers)], u)...)
}

func (e engineStager) Digest(src model.Source) (string, error) { return e.s.Digest(src) }

func (e engineStager) Stage(ref, want string) (model.Staged, error) {
	u, err := e.engine(ref)
	if err != nil {
		return model.Staged{}, err
	}
	return e.s.Stage(ref, want, u)
}

// Accounts gives each pool without User= a user of its own
// (*users.Table).
type Accounts interface {
	For(pool string) (model.User, error)
}

func (e engineStager) Hashing(ref string) (int64, int64, bool) { return e.s.Hashing(ref) }

// FromPool builds a supervisor's configuration from a pool file, the
// manager settings, the GPU inventory and the model stager, which learns
// the pool's Model= (the daemon still replaces that set on every
// configuration load). The pool's models are staged for its [Engine]
// User=, looked up at each start (the user may be created after the pool
// file), or without User= for the user of its own that accounts gives it.
func FromPool(p *config.Pool, m *config.Manager, inv *gpu.Inventory, stager ModelStager, accounts Accounts) (Config, error) {
	gpus, err := inv.Resolve(p.Devices)
	if err != nil {
		return Config{}, fmt.Errorf("pool %s (%s): %w", p.ID, p.File, err)
	}
	mask, err := visibleDevices(p, gpus)
	if err != nil {
		return Config{}, err
	}
	// %d is the engine's CUDA_VISIBLE_DEVICES, in every field.
	specifiers := func(model string) config.Specifiers {
		sp := p.Specifiers(model)
		sp.Devices = mask
		return sp
	}
	stager.AddPoolModels(p.Model)
	who := func() (model.User, error) { return model.LookupUser(p.Engine.User) }
	if p.Engine.User == "" {
		if accounts == nil {
			return Config{}, fmt.Errorf("pool %s (%s): no User= and no table of the engines' own users", p.ID, p.File)
		}
		who = func() (model.User, error) { return accounts.For(p.ID) }
	}
	// A control node a host lacks is simply not needed there (and systemd
	// refuses DeviceAllow= of a missing node); a GPU's own node must be
	// there, which startEngine checks at each start.
	var nodes []string
	gpuNode := map[string]bool{}
	for _, g := range gpus {
		gpuNode[g.Node] = true
	}
	for _, n := range inv.DeviceNodes(gpus) {
		if _, err := os.Stat(n); err == nil || gpuNode[n] {
			nodes = append(nodes, n)
		}
	}
	build := func(model string) engine.Spec {
		sp := specifiers(model)
		argv := make([]string, len(p.Engine.ExecStart))
		for i, a := range p.Engine.ExecStart {
			argv[i] = sp.Expand(a)
		}
		env := []string{"CUDA_VISIBLE_DEVICES=" + mask, "NVIDIA_VISIBLE_DEVICES=" + mask}
		if p.Engine.DeviceIDs == config.DeviceIDsIndex {
			env = append(env, "CUDA_DEVICE_ORDER=PCI_BUS_ID")
		}
		for _, e := range p.Engine.Environment {
			env = append(env, sp.Expand(e))
		}
		return engine.Spec{
			Pool:        p.ID,
			Description: p.Description,
			Argv:        argv,
			Env:         env,
			User:        p.Engine.User,
			Account:     who,
			DeviceNodes: nodes,
			Scope:       p.Scope,
			StopTimeout: p.Engine.StopTimeout,
			Socket:      filepath.Join(m.RuntimeDir, "pools", p.ID+".sock"),
			Version:     p.Engine.VersionCommand,
			CacheDir:    filepath.Join(m.CacheDir, p.ID),
		}
	}
	health := p.Health
	health.ProgressURL = specifiers("").Expand(health.ProgressURL)
	return Config{
		Pool:           p.ID,
		Build:          build,
		HealthURL:      specifiers("").Expand(p.Engine.HealthURL),
		Health:         health,
		Restart:        p.Restart,
		Model:          p.Model,
		ModelDigest:    p.ModelDigest,
		EngineVersion:  p.Engine.Version,
		VersionCommand: p.Engine.VersionCommand,
		DeviceMask:     strings.Join(p.Devices, ","),
		Slots:          p.Slots,
		IdleStop:       idleStop(p),
		StartOnLease:   p.StartOnLease,
		Sleep:          p.Engine.Sleep,
		SleepLevel:     p.Engine.SleepLevel,
		IdleMark:       filepath.Join(m.RuntimeDir, "idle", p.ID),
		Stager:         engineStager{stager, who},
		Holders:        GPUHolders(inv, gpus, nil),
		Memory:         gpuMemory(inv, gpus),
		MemoryRequired: p.MemoryRequired,
		Inventory:      inv,
		Port:           p.Engine.Port,
		Records:        state.Dir{Path: filepath.Join(m.RuntimeDir, "pools"), Mode: 0o644, NoSync: true},
		State:          state.Dir{Path: filepath.Join(m.StateDir, "pools"), Mode: 0o600},
	}, nil
}

// visibleDevices is the engine's CUDA_VISIBLE_DEVICES for gpus, in the
// pool's order and its DeviceIDs= form.
func visibleDevices(p *config.Pool, gpus []gpu.GPU) (string, error) {
	if p.Engine.DeviceIDs != config.DeviceIDsIndex {
		return gpu.VisibleDevices(gpus), nil
	}
	ids := make([]string, len(gpus))
	for i, g := range gpus {
		if strings.HasPrefix(g.UUID, "MIG-") {
			return "", fmt.Errorf("pool %s (%s): [Engine] DeviceIDs=index: MIG device %s has no index CUDA_VISIBLE_DEVICES can name (set DeviceIDs=uuid)", p.ID, p.File, g.UUID)
		}
		ids[i] = strconv.Itoa(g.Index)
	}
	return strings.Join(ids, ","), nil
}

// GPUHolders lists the processes on gpus: NVML's running compute processes
// (lib nil: the host's NVML), or with the static inventory the processes
// holding a GPU's own device node open (not the control nodes every CUDA
// process opens).
func GPUHolders(inv *gpu.Inventory, gpus []gpu.GPU, lib gpu.NVML) func() ([]GPUHolder, error) {
	return func() ([]GPUHolder, error) {
		var out []GPUHolder
		var opens *gpu.NodeOpens
		unchecked := 0
		for _, g := range gpus {
			var hs []gpu.Holder
			var err error
			if inv.Source == gpu.SourceNVML {
				hs, err = gpu.ComputeProcesses(lib, g.UUID, "/proc")
			} else {
				// One scan of /proc for all the pool's GPUs, shared
				// with the pools that start at the same time.
				if opens == nil {
					if opens, err = gpu.ProcScanner.Scan(); err != nil {
						return nil, fmt.Errorf("processes holding %s: %w", g.Node, err)
					}
				}
				hs = opens.Holders([]string{g.Node})
				unchecked = opens.Unchecked()
			}
			if err != nil {
				return nil, err
			}
			for _, h := range hs {
				out = append(out, GPUHolder{GPU: g.UUID, PID: h.PID, Command: h.Command, Unit: h.Unit})
			}
		}
		if len(out) == 0 && unchecked > 0 {
			// Not a pass: the scan could not look at every process.
			return nil, &gpu.UncheckedError{N: unchecked}
		}
		return out, nil
	}
}

// gpuMemory reads the memory of gpus where NVML can (nil: the static
// inventory cannot).
func gpuMemory(inv *gpu.Inventory, gpus []gpu.GPU) func() ([]gpu.DeviceMemory, error) {
	if inv.Source != gpu.SourceNVML {
		return nil
	}
	return GPUMemory(gpus, nil)
}

// idleStop is how long the pool may be unused before it goes idle (0:
// never, as Pin= says).
func idleStop(p *config.Pool) time.Duration {
	if p.Pin {
		return 0
	}
	return p.IdleStop
}
