package supervisor_test

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/gpu"
	"github.com/llorch/pool-managerd/internal/model"
	. "github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/users"
)

const (
	uuid0 = "GPU-8f2c1a70-0000-4000-8000-000000000000"
	uuid1 = "GPU-8f2c1a70-0000-4000-8000-000000000001"
)

// specFor loads a pool file beside a static inventory of two GPUs and
// builds its supervisor configuration.
func specFor(t *testing.T, pool string) (*config.Pool, *config.Manager, *gpu.Inventory, ModelStager) {
	t.Helper()
	dir := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "pools.d"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pool-managerd.conf"), []byte("[Manager]\nCacheDir=/srv/cache\n[Inventory]\nBackend=static\nDevice=0 "+uuid0+" /dev/nvidia0\nDevice=1 "+uuid1+" /dev/nvidia1\n"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pools.d", "p.pool"), []byte(pool), 0o644))
	c, err := config.Load(dir)
	require.NoError(t, err)
	inv, err := gpu.Load(c.Manager.Inventory, nil, "")
	require.NoError(t, err)
	return c.Pools[0], &c.Manager, inv, model.New(dir, filepath.Join(dir, "staged"))
}

const specPool = `[Pool]
Devices=%s
Model=/models/m.gguf
[Engine]
ExecStart=/usr/bin/engine --model %%m --port %%p --gpus %%d
Port=8081
HealthURL=http://127.0.0.1:%%p/health?gpus=%%d
Environment=GPUS=%%d
%s
[Health]
ProgressURL=http://127.0.0.1:%%p/metrics?gpus=%%d
StallSec=60
`

// %d is the engine's CUDA_VISIBLE_DEVICES in every field, in the pool's
// order: UUIDs by default, NVML indices with DeviceIDs=index.
func TestSpecDeviceIDs(t *testing.T) {
	cases := []struct {
		name, devices, extra, mask string
		order                      bool
	}{
		{"uuid by default", "1 0", "", uuid1 + "," + uuid0, false},
		{"uuid", "1 " + uuid0, "DeviceIDs=uuid", uuid1 + "," + uuid0, false},
		{"index", "1 " + uuid0, "DeviceIDs=index", "1,0", true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p, m, inv, st := specFor(t, fmtPool(c.devices, c.extra))
			cfg, err := FromPool(p, m, inv, st, testAccounts(t))
			require.NoError(t, err)
			s := cfg.Build("/staged/m.gguf")
			assert.Equal(t, []string{"/usr/bin/engine", "--model", "/staged/m.gguf", "--port", "8081", "--gpus", c.mask}, s.Argv)
			want := []string{"CUDA_VISIBLE_DEVICES=" + c.mask, "NVIDIA_VISIBLE_DEVICES=" + c.mask}
			if c.order {
				want = append(want, "CUDA_DEVICE_ORDER=PCI_BUS_ID")
			}
			assert.Equal(t, append(want, "GPUS="+c.mask), s.Env)
			assert.Equal(t, "http://127.0.0.1:8081/health?gpus="+c.mask, cfg.HealthURL)
			assert.Equal(t, "http://127.0.0.1:8081/metrics?gpus="+c.mask, cfg.Health.ProgressURL)
			assert.Equal(t, "/srv/cache/p", s.CacheDir)
			assert.Equal(t, "1,"+p.Devices[1], cfg.DeviceMask, "the bus and journal keep Devices= as written")
		})
	}
}

// A MIG device has no NVML index of its own: with DeviceIDs=index it is
// refused, naming the pool file, the key and the device.
func TestSpecDeviceIDsIndexRefusesMIG(t *testing.T) {
	p, m, _, st := specFor(t, fmtPool("0", ""))
	mig := "MIG-8f2c1a70-0000-4000-8000-0000000000a0"
	inv := &gpu.Inventory{Source: gpu.SourceNVML, GPUs: []gpu.GPU{
		{Index: 0, UUID: uuid0, Minor: 0, Node: "/dev/nvidia0"},
		{Index: 0, UUID: mig, Minor: 0, Node: "/dev/nvidia0", Parent: uuid0},
	}}
	p.Devices = []string{mig}
	_, err := FromPool(p, m, inv, st, testAccounts(t))
	require.NoError(t, err, "UUIDs name MIG devices")
	p.Engine.DeviceIDs = config.DeviceIDsIndex
	_, err = FromPool(p, m, inv, st, testAccounts(t))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "pool p ("+p.File+"): [Engine] DeviceIDs=index: MIG device "+mig+" has no index")
}

func fmtPool(devices, extra string) string { return fmt.Sprintf(specPool, devices, extra) }

// testAccounts is a table of the engines' own users in a test's directory.
func testAccounts(t *testing.T) Accounts {
	return users.Open(filepath.Join(t.TempDir(), users.File), "", 65536, 99999, "")
}

// IdleStopSec= reaches the supervisor unless Pin= keeps the pool up; the
// idle mark lies under the runtime directory.
func TestSpecOnDemand(t *testing.T) {
	p, m, inv, st := specFor(t, fmtPool("0", "")+"[Pool]\nIdleStopSec=90\nStartOnLease=yes\n")
	cfg, err := FromPool(p, m, inv, st, testAccounts(t))
	require.NoError(t, err)
	assert.Equal(t, 90*time.Second, cfg.IdleStop)
	assert.True(t, cfg.StartOnLease)
	assert.Equal(t, filepath.Join(m.RuntimeDir, "idle", "p"), cfg.IdleMark)
	p.Pin = true
	cfg, err = FromPool(p, m, inv, st, testAccounts(t))
	require.NoError(t, err)
	assert.Zero(t, cfg.IdleStop, "Pin= keeps it up")
	assert.Equal(t, config.SleepNone, cfg.Sleep, "idleness stops the engine by default")

	p, m, inv, st = specFor(t, fmtPool("0", "Sleep=vllm\nSleepLevel=2")+"[Pool]\nIdleStopSec=90\n")
	cfg, err = FromPool(p, m, inv, st, testAccounts(t))
	require.NoError(t, err)
	assert.Equal(t, config.SleepVLLM, cfg.Sleep)
	assert.Equal(t, 2, cfg.SleepLevel)
	assert.Equal(t, 8081, cfg.Port)
}
