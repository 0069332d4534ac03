package supervisor

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/engine"
	"github.com/llorch/pool-managerd/internal/gpu"
)

// FromPool builds a supervisor's configuration from a pool file, the GPU
// inventory and the path of the model to load.
func FromPool(p *config.Pool, inv *gpu.Inventory, model string) (Config, error) {
	gpus, err := inv.Resolve(p.Devices)
	if err != nil {
		return Config{}, fmt.Errorf("pool %s (%s): %w", p.ID, p.File, err)
	}
	mask := gpu.VisibleDevices(gpus)
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
	var nodes []string
	for _, n := range inv.DeviceNodes(gpus) {
		// DeviceAllow= of a missing node is refused by systemd; a control
		// node a host lacks is simply not needed there.
		if _, err := os.Stat(n); err == nil {
			nodes = append(nodes, n)
		}
	}
	return Config{
		Pool: p.ID,
		Spec: engine.Spec{
			Pool:        p.ID,
			Description: p.Description,
			Argv:        argv,
			Env:         env,
			User:        p.Engine.User,
			DeviceNodes: nodes,
			Scope:       p.Scope,
			StopTimeout: p.Engine.StopTimeout,
		},
		HealthURL: sp.Expand(p.Engine.HealthURL),
		Health: HealthConfig{Interval: p.Health.Interval, Timeout: p.Health.Timeout,
			StartTimeout: p.Health.StartTimeout, FailureThreshold: p.Health.FailureThreshold},
		Restart:       p.Restart,
		Model:         p.Model,
		EngineVersion: p.Engine.Version,
		DeviceMask:    strings.Join(p.Devices, ","),
	}, nil
}

// ModelPath resolves a pool's model reference to a path (staging proper,
// with digests, comes with reloads).
func ModelPath(ref, modelsDir string) string {
	ref = strings.TrimPrefix(ref, "file://")
	if filepath.IsAbs(ref) {
		return ref
	}
	return filepath.Join(modelsDir, ref)
}
