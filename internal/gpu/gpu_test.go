package gpu

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/config"
)

// devRoot is a stand-in /dev with two of the three control nodes.
func devRoot(t *testing.T) string {
	dir := t.TempDir()
	for _, n := range []string{"nvidiactl", "nvidia-uvm"} {
		require.NoError(t, os.WriteFile(filepath.Join(dir, n), nil, 0o644))
	}
	return dir
}

var staticCfg = config.Inventory{
	Devices: []config.StaticDevice{
		{Index: 0, UUID: "GPU-8f2c1a70-0000-4000-8000-000000000000", Node: "/dev/nvidia0"},
		{Index: 1, UUID: "GPU-8f2c1a70-0000-4000-8000-000000000001", Node: "/dev/nvidia1"},
	},
	ControlDevices: []string{"/dev/nvidiactl", "/dev/nvidia-uvm"},
}

var staticGPUs = []GPU{
	{Index: 0, UUID: "GPU-8f2c1a70-0000-4000-8000-000000000000", Minor: 0, Node: "/dev/nvidia0"},
	{Index: 1, UUID: "GPU-8f2c1a70-0000-4000-8000-000000000001", Minor: 1, Node: "/dev/nvidia1"},
}

func withBackend(c config.Inventory, b config.Backend) config.Inventory {
	c.Backend = b
	return c
}

func TestLoad(t *testing.T) {
	brokenMinor := newFake()
	brokenMinor.gpus[1].minorErr = assert.AnError

	tests := []struct {
		name        string
		cfg         config.Inventory
		lib         *fakeNVML
		wantSource  string
		wantGPUs    []GPU
		wantControl []string
		wantErr     []string // substrings
		wantNoLib   bool     // the error, or Fallback, is ErrNoLibrary
	}{
		{
			name: "nvml: minors from NVML, MIG device on its parent's node, control nodes present",
			cfg:  config.Inventory{Backend: config.BackendNVML}, lib: newFake(),
			wantSource: SourceNVML, wantGPUs: []GPU{gpuA, gpuB, gpuMIG},
			wantControl: []string{"/dev/nvidiactl", "/dev/nvidia-uvm"},
		},
		{
			name: "auto with NVML ignores the static lines",
			cfg:  withBackend(staticCfg, config.BackendAuto), lib: newFake(),
			wantSource: SourceNVML, wantGPUs: []GPU{gpuA, gpuB, gpuMIG},
			wantControl: []string{"/dev/nvidiactl", "/dev/nvidia-uvm"},
		},
		{
			name: "static does not touch NVML",
			cfg:  withBackend(staticCfg, config.BackendStatic), lib: newFake(),
			wantSource: SourceStatic, wantGPUs: staticGPUs,
			wantControl: []string{"/dev/nvidiactl", "/dev/nvidia-uvm"},
		},
		{
			name: "static node that is not /dev/nvidiaN has no minor",
			cfg: config.Inventory{Backend: config.BackendStatic,
				Devices: []config.StaticDevice{{Index: 0, UUID: "GPU-8f2c1a70-0000-4000-8000-000000000000", Node: "/dev/fake-gpu0"}}},
			lib:        newFake(),
			wantSource: SourceStatic,
			wantGPUs:   []GPU{{Index: 0, UUID: "GPU-8f2c1a70-0000-4000-8000-000000000000", Minor: -1, Node: "/dev/fake-gpu0"}},
		},
		{
			name: "nvml without the library is an error that says what to do",
			cfg:  config.Inventory{Backend: config.BackendNVML}, lib: missingLib(),
			wantErr: []string{"Backend=nvml", "libnvidia-ml.so.1 not found", "is the NVIDIA driver installed?",
				"use [Inventory] Backend=static with Device= lines"},
			wantNoLib: true,
		},
		{
			name: "auto without the library falls back to static",
			cfg:  withBackend(staticCfg, config.BackendAuto), lib: missingLib(),
			wantSource: SourceStatic, wantGPUs: staticGPUs,
			wantControl: []string{"/dev/nvidiactl", "/dev/nvidia-uvm"},
			wantNoLib:   true,
		},
		{
			name: "auto without the library or Device= lines is empty, not an error",
			cfg:  config.Inventory{Backend: config.BackendAuto}, lib: missingLib(),
			wantSource: SourceStatic, wantNoLib: true,
		},
		{
			name: "a GPU whose minor NVML cannot tell fails the load",
			cfg:  config.Inventory{Backend: config.BackendAuto}, lib: brokenMinor,
			wantErr: []string{"GPU 1 (" + uuidB + "): minor number"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			inv, err := Load(tt.cfg, tt.lib, devRoot(t))
			assert.Zero(t, tt.lib.open, "every Init is shut down")
			if tt.cfg.Backend == config.BackendStatic {
				assert.Zero(t, tt.lib.inits)
			}
			if len(tt.wantErr) > 0 {
				require.Error(t, err)
				for _, s := range tt.wantErr {
					assert.Contains(t, err.Error(), s)
				}
				if tt.wantNoLib {
					assert.ErrorIs(t, err, ErrNoLibrary)
				}
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.wantSource, inv.Source)
			assert.Equal(t, tt.wantGPUs, inv.GPUs)
			assert.Equal(t, tt.wantControl, inv.Control)
			if tt.wantNoLib {
				assert.ErrorIs(t, inv.Fallback, ErrNoLibrary)
			} else {
				assert.NoError(t, inv.Fallback)
			}
		})
	}
}

func TestLoadNVMLControlNodesAllPresent(t *testing.T) {
	dir := devRoot(t)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "nvidia-uvm-tools"), nil, 0o644))
	inv, err := Load(config.Inventory{Backend: config.BackendNVML}, newFake(), dir)
	require.NoError(t, err)
	assert.Equal(t, ControlNodes, inv.Control)
}

func TestResolve(t *testing.T) {
	nv, err := Load(config.Inventory{Backend: config.BackendNVML}, newFake(), devRoot(t))
	require.NoError(t, err)
	st, err := Load(withBackend(staticCfg, config.BackendStatic), nil, "")
	require.NoError(t, err)
	empty, err := Load(config.Inventory{Backend: config.BackendAuto}, missingLib(), "")
	require.NoError(t, err)

	tests := []struct {
		name    string
		inv     *Inventory
		devices []string
		want    []GPU
		wantErr []string
	}{
		{name: "by index, in the pool's order", inv: nv, devices: []string{"1", "0"}, want: []GPU{gpuB, gpuA}},
		{name: "by GPU UUID", inv: nv, devices: []string{uuidA}, want: []GPU{gpuA}},
		{name: "UUIDs ignore case", inv: nv, devices: []string{"gpu-8F2C1A70-0000-4000-8000-00000000000B"}, want: []GPU{gpuB}},
		{name: "MIG UUID gets the parent's node", inv: nv, devices: []string{uuidMIG}, want: []GPU{gpuMIG}},
		{name: "legacy MIG-GPU-<uuid>/<gi>/<ci>", inv: nv, devices: []string{"MIG-" + uuidB + "/1/0"}, want: []GPU{gpuMIG}},
		{
			name: "unknown index lists what NVML knows", inv: nv, devices: []string{"0", "2"},
			wantErr: []string{`GPU "2" is not on this host: NVML reports 0 ` + uuidA + ` (/dev/nvidia3), 1 ` + uuidB + ` (/dev/nvidia7), ` + uuidMIG + ` (MIG on GPU 1)`},
		},
		{
			name: "unknown UUID", inv: nv, devices: []string{"GPU-8f2c1a70-0000-4000-8000-0000000000ff"},
			wantErr: []string{`GPU "GPU-8f2c1a70-0000-4000-8000-0000000000ff" is not on this host`},
		},
		{
			name: "legacy MIG name with the wrong instance", inv: nv, devices: []string{"MIG-" + uuidB + "/2/0"},
			wantErr: []string{`is not on this host`},
		},
		{
			name: "the same GPU twice", inv: nv, devices: []string{"0", uuidA},
			wantErr: []string{`GPU "0" and "` + uuidA + `" are the same device`},
		},
		{name: "static by index", inv: st, devices: []string{"1"}, want: staticGPUs[1:]},
		{name: "static by UUID", inv: st, devices: []string{"GPU-8F2C1A70-0000-4000-8000-000000000000"}, want: staticGPUs[:1]},
		{
			name: "static unknown names the Device= lines", inv: st, devices: []string{"2"},
			wantErr: []string{`GPU "2" is not on this host: the static inventory ([Inventory] Device= lines) has 0 GPU-8f2c1a70-0000-4000-8000-000000000000 (/dev/nvidia0), 1 GPU-8f2c1a70-0000-4000-8000-000000000001 (/dev/nvidia1)`},
		},
		{
			name: "empty fallback inventory explains itself when a pool asks", inv: empty, devices: []string{"0"},
			wantErr: []string{`GPU "0": the GPU inventory is empty: no Device= lines, and [Inventory] Backend=auto could not use NVML: NVML: libnvidia-ml.so.1 not found (is the NVIDIA driver installed?); use [Inventory] Backend=static with Device= lines on hosts without it`},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.inv.Resolve(tt.devices)
			if len(tt.wantErr) > 0 {
				require.Error(t, err)
				for _, s := range tt.wantErr {
					assert.Contains(t, err.Error(), s)
				}
				assert.Nil(t, got)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
}

func TestDeviceNodes(t *testing.T) {
	nv := &Inventory{Source: SourceNVML, GPUs: []GPU{gpuA, gpuB, gpuMIG}, Control: []string{"/dev/nvidiactl", "/dev/nvidia-uvm"}}
	st := &Inventory{Source: SourceStatic, GPUs: staticGPUs, Control: []string{"/dev/nvidiactl"}}
	tests := []struct {
		name string
		inv  *Inventory
		gpus []GPU
		want []string
	}{
		{name: "minor, not index", inv: nv, gpus: []GPU{gpuA}, want: []string{"/dev/nvidia3", "/dev/nvidiactl", "/dev/nvidia-uvm"}},
		{name: "MIG device and its parent share one node", inv: nv, gpus: []GPU{gpuMIG, gpuB, gpuA},
			want: []string{"/dev/nvidia7", "/dev/nvidia3", "/dev/nvidiactl", "/dev/nvidia-uvm"}},
		{name: "static", inv: st, gpus: staticGPUs, want: []string{"/dev/nvidia0", "/dev/nvidia1", "/dev/nvidiactl"}},
		{name: "no GPUs: control nodes only", inv: nv, gpus: nil, want: []string{"/dev/nvidiactl", "/dev/nvidia-uvm"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, tt.inv.DeviceNodes(tt.gpus))
		})
	}
}

func TestVisibleDevices(t *testing.T) {
	tests := []struct {
		name string
		gpus []GPU
		want string
	}{
		{name: "none", gpus: nil, want: ""},
		{name: "one", gpus: []GPU{gpuB}, want: uuidB},
		{name: "UUIDs in order, never indices", gpus: []GPU{gpuB, gpuA}, want: uuidB + "," + uuidA},
		{name: "MIG device by its own UUID", gpus: []GPU{gpuMIG}, want: uuidMIG},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, VisibleDevices(tt.gpus))
		})
	}
}
