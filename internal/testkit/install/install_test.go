package install

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

// The packages are built outside (make packages) and installed inside a
// fresh sandbox, where nothing of the machine is touched.
func TestMain(m *testing.M) {
	os.Exit(sandbox.Main(m, sandbox.Options{Nodes: sandbox.FakeGPUs}, setup))
}

func setup() ([]string, []string, func(), error) {
	root, err := filepath.Abs("../../..")
	if err != nil {
		return nil, nil, nil, err
	}
	if out, err := exec.Command("make", "-C", root, "packages").CombinedOutput(); err != nil {
		return nil, nil, nil, fmt.Errorf("make packages: %v: %s", err, out)
	}
	env, binds, cleanup, err := sandbox.Build("github.com/llorch/pool-managerd/cmd/pool-engine-sim")()
	if err != nil {
		return nil, nil, cleanup, err
	}
	// The checkout may be under /tmp, which the sandbox has its own of.
	build := filepath.Join(root, "build")
	return append(env, "PACKAGES="+build), append(binds, build), cleanup, nil
}

func sh(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	require.NoError(t, err, "%s %v: %s", name, args, out)
	return strings.TrimSpace(string(out))
}

func glob(t *testing.T, pattern string) string {
	m, err := filepath.Glob(filepath.Join(os.Getenv("PACKAGES"), pattern))
	require.NoError(t, err)
	require.Len(t, m, 1, pattern)
	return m[0]
}

func TestDebInstallsRunsAndRemoves(t *testing.T) {
	sandbox.Need(t)
	// The operator's configuration, there before the package.
	require.NoError(t, os.MkdirAll("/etc/pool-managerd/pool-managerd.conf.d", 0o755))
	require.NoError(t, os.MkdirAll("/etc/pool-managerd/pools.d", 0o755))
	require.NoError(t, os.WriteFile("/etc/pool-managerd/pool-managerd.conf.d/gpus.conf", []byte(`[Inventory]
Device=0 GPU-8f2c1a70-0000-4000-8000-000000000000 /dev/nvidia0
Device=1 GPU-8f2c1a70-0000-4000-8000-000000000001 /dev/nvidia1
ControlDevice=/dev/nvidiactl
`), 0o644))
	require.NoError(t, os.MkdirAll("/var/lib/pool-managerd/models", 0o755))
	require.NoError(t, os.WriteFile("/var/lib/pool-managerd/models/tiny.gguf", []byte("GGUF\x03\x00\x00\x00 tiny"), 0o644))
	sim := os.Getenv(sandbox.BinEnv("pool-engine-sim"))
	for i, id := range []string{"alpha", "beta"} {
		require.NoError(t, os.WriteFile("/etc/pool-managerd/pools.d/"+id+".pool",
			testpool.SimPoolFile(sim, strconv.Itoa(i), "tiny.gguf", 18431+i, "[Health]\nIntervalSec=0.5\nTimeoutSec=0.5\n"), 0o644))
	}

	if out, err := exec.Command("dpkg", "-i", glob(t, "pool-managerd_*.deb")).CombinedOutput(); err != nil {
		j, _ := exec.Command("journalctl", "--no-pager", "-n", "60", "-o", "short-monotonic").CombinedOutput()
		t.Fatalf("dpkg -i: %v: %s\njournal:\n%s", err, out, j)
	}
	assert.Equal(t, "active", sh(t, "systemctl", "is-active", "pool-managerd.service"))
	assert.Equal(t, "enabled", sh(t, "systemctl", "is-enabled", "pool-managerd.service"))
	assert.Contains(t, sh(t, "getent", "passwd", "pool-engine"), "/usr/sbin/nologin")
	sh(t, "getent", "group", "pool-admin")
	for _, id := range []string{"alpha", "beta"} {
		require.Eventually(t, func() bool {
			out, err := exec.Command("busctl", "get-property", "org.llorch.PoolManager1", "/org/llorch/PoolManager1/pool/"+id,
				"org.llorch.PoolManager1.Pool", "Ready").CombinedOutput()
			return err == nil && strings.TrimSpace(string(out)) == "b true"
		}, 30*time.Second, 100*time.Millisecond, "pool %s ready; journal:\n%s", id, journal())
	}
	pid := strings.TrimPrefix(sh(t, "busctl", "get-property", "org.llorch.PoolManager1", "/org/llorch/PoolManager1/pool/alpha",
		"org.llorch.PoolManager1.Pool", "MainPID"), "u ")
	status, err := os.ReadFile("/proc/" + pid + "/status")
	require.NoError(t, err)
	// Each pool's engine runs as a user of its own, recorded in the state
	// directory; pool-engine is only its supplementary group.
	var recs struct {
		Pools map[string]struct{ UID int } `json:"pools"`
	}
	b, err := os.ReadFile("/var/lib/pool-managerd/engine-users.json")
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(b, &recs))
	uid, gid := recs.Pools["alpha"].UID, recs.Pools["alpha"].UID
	assert.True(t, uid >= 65536 && uid <= 99999, "alpha's uid %d from the default EngineUIDs=", uid)
	assert.NotEqual(t, uid, recs.Pools["beta"].UID, "two pools, two users")
	assert.Contains(t, string(status), fmt.Sprintf("Uid:\t%d\t", uid), "the engine runs as its pool's own user")
	assert.Contains(t, string(status), fmt.Sprintf("Gid:\t%d\t", gid))
	grp := strings.Split(sh(t, "getent", "group", "pool-engine"), ":")
	require.Len(t, grp, 4)
	assert.Contains(t, string(status), "Groups:\t"+grp[2]+" \n", "and group pool-engine besides, for models shared with it")
	assert.Equal(t, owner{0, 0, 0o755}, ownerOf(t, "/var/cache/pool-managerd"))
	assert.Equal(t, owner{uint32(uid), uint32(gid), 0o700}, ownerOf(t, "/var/cache/pool-managerd/alpha"), "the engine's HOME and caches")
	engines, err := strconv.Atoi(grp[2])
	require.NoError(t, err)
	assert.Equal(t, owner{0, uint32(engines), 0o710}, ownerOf(t, "/var/lib/pool-managerd/staged"), "staged models: the engines' group passes, nobody else")
	environ, err := os.ReadFile("/proc/" + pid + "/environ")
	require.NoError(t, err)
	assert.Contains(t, string(environ), "\x00HOME=/var/cache/pool-managerd/alpha\x00", "writable under the unit's ProtectHome= and ProtectSystem=")
	require.Eventually(t, func() bool {
		b, err := os.ReadFile("/var/lib/prometheus/node-exporter/pool-managerd.prom")
		return err == nil && bytes.Contains(b, []byte(`pool_managerd_pool_ready{pool_id="beta"} 1`))
	}, 30*time.Second, 100*time.Millisecond, "the textfile")
	assert.Contains(t, sh(t, "journalctl", "--list-catalog"), "b7d7597cfa114df0a87d0da1ee5155ee")
	assert.Contains(t, sh(t, "man", "-w", "pool-managerd.pool"), "/usr/share/man/man5/pool-managerd.pool.5.gz")

	// Removal drains and stops everything, and keeps configuration.
	sh(t, "dpkg", "-r", "pool-managerd")
	out, _ := exec.Command("systemctl", "is-active", "pool-managerd.service").CombinedOutput()
	assert.NotEqual(t, "active", strings.TrimSpace(string(out)))
	out, _ = exec.Command("pgrep", "-f", "pool-engine-sim").CombinedOutput()
	assert.Empty(t, strings.TrimSpace(string(out)), "no engine is left")
	_, err = os.Stat("/usr/lib/systemd/system/pool-managerd.service")
	assert.True(t, os.IsNotExist(err))
	_, err = os.Stat("/etc/pool-managerd/pool-managerd.conf")
	assert.NoError(t, err, "dpkg -r keeps the configuration")
	_, err = os.Stat("/var/lib/pool-managerd/models/tiny.gguf")
	assert.NoError(t, err, "dpkg -r keeps the state")
	staged, err := filepath.Glob("/var/lib/pool-managerd/staged/*/tiny.gguf")
	require.NoError(t, err)
	require.NotEmpty(t, staged, "the model was staged")
	_, err = os.Stat("/var/cache/pool-managerd/alpha")
	assert.NoError(t, err, "dpkg -r keeps the engines' caches")
	sh(t, "dpkg", "-P", "pool-managerd")
	_, err = os.Stat("/etc/pool-managerd")
	assert.True(t, os.IsNotExist(err), "a purge removes the configuration")
	for _, p := range []string{"/var/lib/pool-managerd/staged", "/var/lib/pool-managerd/pools", "/var/lib/pool-managerd/engine-users.json", "/var/lib/prometheus/node-exporter/pool-managerd.prom", "/var/cache/pool-managerd"} {
		_, err = os.Stat(p)
		assert.True(t, os.IsNotExist(err), "a purge removes %s", p)
	}
	model, err := os.ReadFile("/var/lib/pool-managerd/models/tiny.gguf")
	assert.NoError(t, err, "a purge keeps the operator's models")
	assert.Equal(t, "GGUF\x03\x00\x00\x00 tiny", string(model))
	require.NoError(t, os.RemoveAll("/var/lib/pool-managerd"))
}

// The .rpm holds the same files as the .deb.
func TestRpmHoldsTheSameFiles(t *testing.T) {
	sandbox.Need(t)
	var deb []string
	for _, l := range strings.Split(sh(t, "dpkg-deb", "-c", glob(t, "pool-managerd_*.deb")), "\n") {
		f := strings.Fields(l)
		if len(f) >= 6 && !strings.HasPrefix(f[0], "d") {
			deb = append(deb, strings.TrimPrefix(f[5], "."))
		}
	}
	rpm, err := rpmFiles(glob(t, "pool-managerd-*.rpm"))
	require.NoError(t, err)
	// The .rpm also owns the package's own directories, or rpm -e would
	// leave them behind; the .deb's directory entries were left out above.
	owned := []string{"/etc/pool-managerd/pools.d", "/etc/pool-managerd/pool-managerd.conf.d",
		"/usr/libexec/pool-managerd", "/usr/share/doc/pool-managerd", "/usr/share/doc/pool-managerd/examples",
		"/usr/share/doc/pool-managerd/examples/pool-managerd.service.d",
		"/usr/share/pool-managerd"}
	var files []string
	for _, f := range rpm {
		if !slices.Contains(owned, f) {
			files = append(files, f)
		}
	}
	for _, d := range owned {
		assert.Contains(t, rpm, d, "the .rpm owns %s", d)
	}
	sort.Strings(deb)
	sort.Strings(files)
	require.NotEmpty(t, deb)
	assert.Equal(t, deb, files)
}

// rpmFiles lists the paths in an RPM's header: the lead, the signature
// header (padded to 8 bytes), then the main header's BASENAMES, DIRNAMES
// and DIRINDEXES tags.
func rpmFiles(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if _, err := f.Seek(96, io.SeekStart); err != nil {
		return nil, err
	}
	readHeader := func() (map[uint32][2]uint32, []byte, int, error) {
		var h [16]byte
		if _, err := io.ReadFull(f, h[:]); err != nil {
			return nil, nil, 0, err
		}
		if !bytes.Equal(h[:3], []byte{0x8e, 0xad, 0xe8}) {
			return nil, nil, 0, fmt.Errorf("not an RPM header")
		}
		n := binary.BigEndian.Uint32(h[8:12])
		size := binary.BigEndian.Uint32(h[12:16])
		index := make([]byte, 16*n)
		if _, err := io.ReadFull(f, index); err != nil {
			return nil, nil, 0, err
		}
		store := make([]byte, size)
		if _, err := io.ReadFull(f, store); err != nil {
			return nil, nil, 0, err
		}
		tags := map[uint32][2]uint32{}
		for i := uint32(0); i < n; i++ {
			e := index[16*i:]
			tags[binary.BigEndian.Uint32(e[0:4])] = [2]uint32{binary.BigEndian.Uint32(e[8:12]), binary.BigEndian.Uint32(e[12:16])}
		}
		return tags, store, int(16 + 16*n + size), nil
	}
	_, _, sigLen, err := readHeader()
	if err != nil {
		return nil, err
	}
	if pad := (8 - sigLen%8) % 8; pad > 0 {
		if _, err := f.Seek(int64(pad), io.SeekCurrent); err != nil {
			return nil, err
		}
	}
	tags, store, _, err := readHeader()
	if err != nil {
		return nil, err
	}
	strs := func(tag uint32) []string {
		t, ok := tags[tag]
		if !ok {
			return nil
		}
		out := make([]string, 0, t[1])
		off := t[0]
		for i := uint32(0); i < t[1]; i++ {
			end := bytes.IndexByte(store[off:], 0)
			out = append(out, string(store[off:off+uint32(end)]))
			off += uint32(end) + 1
		}
		return out
	}
	base, dirs := strs(1117), strs(1118)
	t, ok := tags[1116]
	if !ok {
		return nil, fmt.Errorf("no DIRINDEXES")
	}
	var out []string
	for i, b := range base {
		di := binary.BigEndian.Uint32(store[t[0]+uint32(4*i):])
		out = append(out, dirs[di]+b)
	}
	return out, nil
}
