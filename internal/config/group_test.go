package config

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// nextPort gives each pool a port of its own.
var nextPort atomic.Int32

func init() { nextPort.Store(9000) }

// groupPool is minimalPool on devices, in group (none when empty), with
// more lines under [Pool].
func groupPool(devices, group, more string) string {
	p := strings.NewReplacer("Devices=0", "Devices="+devices, "Port=8081", fmt.Sprintf("Port=%d", nextPort.Add(1))).Replace(minimalPool)
	if group != "" {
		p += "[Pool]\nGroup=" + group + "\n"
	}
	return p + more
}

const groupInventory = "[Inventory]\nBackend=static\n" +
	"Device=0 GPU-8f2c1a70-0000-4000-8000-000000000000 /dev/nvidia0\n" +
	"Device=1 GPU-11111111-1111-4111-8111-111111111111 /dev/nvidia1\n"

// Members of one group may name the same GPUs, in any of its names; the
// group's drain time defaults to 30 s.
func TestGroupSharesGPUs(t *testing.T) {
	dir := writeDir(t, map[string]string{
		ManagerFile:      groupInventory,
		"pools.d/a.pool": groupPool("0", "chat", "GroupDrainSec=5\n"),
		"pools.d/b.pool": groupPool("GPU-8F2C1A70-0000-4000-8000-000000000000", "chat", ""),
		"pools.d/c.pool": groupPool("1", "", ""),
	})
	c, err := Load(dir)
	require.NoError(t, err)
	require.Len(t, c.Pools, 3)
	assert.Equal(t, "chat", c.Pools[0].Group)
	assert.Equal(t, 5*time.Second, c.Pools[0].GroupDrain)
	assert.Equal(t, "chat", c.Pools[1].Group)
	assert.Equal(t, DefaultGroupDrain, c.Pools[1].GroupDrain)
	assert.Empty(t, c.Pools[2].Group)
}

// A GPU named by two pools outside one group, however it is named, is
// refused naming both files and lines; so are group members on other GPUs
// and a bad group name.
func TestGroupSharedGPUErrors(t *testing.T) {
	cases := []struct {
		name  string
		files map[string]string
		want  string
	}{
		{"no group", map[string]string{"pools.d/a.pool": groupPool("0", "", ""), "pools.d/b.pool": groupPool("0", "", "")},
			`b.pool:2: [Pool] Devices=: GPU "0" is already used by pool "a" (%s/a.pool:2): pools share a GPU only with the same Group=`},
		{"one in a group", map[string]string{"pools.d/a.pool": groupPool("0", "chat", ""), "pools.d/b.pool": groupPool("0", "", "")},
			`b.pool:2: [Pool] Devices=: GPU "0" is already used by pool "a" (%s/a.pool:2)`},
		{"other groups", map[string]string{"pools.d/a.pool": groupPool("0", "chat", ""), "pools.d/b.pool": groupPool("0", "code", "")},
			`b.pool:2: [Pool] Devices=: GPU "0" is already used by pool "a"`},
		{"index and UUID", map[string]string{ManagerFile: groupInventory,
			"pools.d/a.pool": groupPool("0", "chat", ""), "pools.d/b.pool": groupPool("GPU-8F2C1A70-0000-4000-8000-000000000000", "", "")},
			`b.pool:2: [Pool] Devices=: GPU "GPU-8F2C1A70-0000-4000-8000-000000000000" is GPU-8f2c1a70-0000-4000-8000-000000000000, which pool "a" names "0" (%s/a.pool:2): pools share a GPU only with the same Group=`},
		{"members on other GPUs", map[string]string{ManagerFile: groupInventory,
			"pools.d/a.pool": groupPool("0 1", "chat", ""), "pools.d/b.pool": groupPool("0", "chat", "")},
			`b.pool:2: [Pool] Devices=: 0 names other GPUs than pool "a" of Group=chat (%s/a.pool:2: 0 1): the members of a group name the same GPUs`},
		{"a drop-in's line", map[string]string{"pools.d/a.pool": groupPool("0", "", ""), "pools.d/b.pool": groupPool("1", "", ""),
			"pools.d/b.pool.d/gpu.conf": "[Pool]\nDevices=\nDevices=0\n"},
			`b.pool.d/gpu.conf:3: [Pool] Devices=: GPU "0" is already used by pool "a" (%s/a.pool:2)`},
		{"bad group name", map[string]string{"pools.d/a.pool": groupPool("0", "chat room", "")},
			`a.pool:8: [Pool] Group=: group name "chat room" must be 1 to 64 characters`},
		{"pinned member", map[string]string{"pools.d/a.pool": groupPool("0", "chat", "Pin=yes\n")},
			`a.pool:9: [Pool] Pin=: yes keeps the engine up, but a member of Group=chat gives its GPUs`},
		{"drain time", map[string]string{"pools.d/a.pool": groupPool("0", "chat", "GroupDrainSec=soon\n")},
			`a.pool:9: [Pool] GroupDrainSec=: "soon" is not a time span`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			for name := range tc.files {
				require.NoError(t, os.MkdirAll(filepath.Join(dir, filepath.Dir(name)), 0o755))
			}
			writeFiles(t, dir, tc.files)
			c, err := Load(dir)
			require.Error(t, err)
			assert.Nil(t, c)
			want := tc.want
			if strings.Contains(want, "%s") {
				want = strings.ReplaceAll(want, "%s", filepath.Join(dir, PoolsDir))
			}
			assert.Contains(t, err.Error(), want)
		})
	}
}

func writeFiles(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	for name, content := range files {
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644))
	}
}
