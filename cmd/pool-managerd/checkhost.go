package main

import (
	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/gpu"
)

// hostErrors is what --check-config finds that a valid configuration
// would fail at on this host once its pools start, against the GPU
// inventory the daemon would load.
func hostErrors(c *config.Config) config.Errors {
	inv, err := gpu.Load(c.Manager.Inventory, newNVML(), "")
	if err != nil {
		f := c.Manager.File
		if f == "" {
			f = "[Inventory]"
		}
		return config.Errors{{File: f, Line: config.KeyLine(c.Manager.File, "Inventory", "Backend"), Section: "Inventory", Key: "Backend", Msg: err.Error()}}
	}
	return config.CheckHost(c, config.Host{GPU: func(dev string) (config.GPUInfo, error) {
		g, err := inv.Resolve([]string{dev})
		if err != nil {
			return config.GPUInfo{}, err
		}
		return config.GPUInfo{UUID: g[0].UUID, Parent: g[0].Parent}, nil
	}})
}
