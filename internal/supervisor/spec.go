package supervisor

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/engine"
	"github.com/llorch/pool-managerd/internal/gpu"
	"github.com/llorch/pool-managerd/internal/state"
)

// FromPool builds a supervisor's configuration from a pool file, the
// manager settings, the GPU inventory and the model stager.
func FromPool(p *config.Pool, m *config.Manager, inv *gpu.Inventory, stager Stager) (Config, error) {
	gpus, err := inv.Resolve(p.Devices)
	if err != nil {
		return Config{}, fmt.Errorf("pool %s (%s): %w", p.ID, p.File, err)
	}
	mask := gpu.VisibleDevices(gpus)
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
		sp := p.Specifiers(model)
		sp.Devices = mask
		argv := make([]string, len(p.Engine.ExecStart))
		for i, a := range p.Engine.ExecStart {
			argv[i] = sp.Expand(a)
		}
		env := []string{"CUDA_VISIBLE_DEVICES=" + mask, "NVIDIA_VISIBLE_DEVICES=" + mask}
		for _, e := range p.Engine.Environment {
			env = append(env, sp.Expand(e))
		}
		return engine.Spec{
			Pool:        p.ID,
			Description: p.Description,
			Argv:        argv,
			Env:         env,
			User:        p.Engine.User,
			DeviceNodes: nodes,
			Scope:       p.Scope,
			StopTimeout: p.Engine.StopTimeout,
			Socket:      filepath.Join(m.RuntimeDir, "pools", p.ID+".sock"),
		}
	}
	return Config{
		Pool:      p.ID,
		Build:     build,
		HealthURL: p.Specifiers("").Expand(p.Engine.HealthURL),
		Health: HealthConfig{Interval: p.Health.Interval, Timeout: p.Health.Timeout,
			StartTimeout: p.Health.StartTimeout, FailureThreshold: p.Health.FailureThreshold},
		Restart:        p.Restart,
		Model:          p.Model,
		ModelDigest:    p.ModelDigest,
		EngineVersion:  p.Engine.Version,
		VersionCommand: p.Engine.VersionCommand,
		DeviceMask:     strings.Join(p.Devices, ","),
		Slots:          p.Slots,
		Stager:         stager,
		Records:        state.Dir{Path: filepath.Join(m.RuntimeDir, "pools"), Mode: 0o644, NoSync: true},
		State:          state.Dir{Path: filepath.Join(m.StateDir, "pools"), Mode: 0o600},
	}, nil
}
