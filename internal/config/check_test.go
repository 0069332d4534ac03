package config

import (
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeGPUs stands in for the host's inventory: GPU 0 and 1 by index and
// UUID, and MIG devices on GPU 1.
var fakeGPUs = map[string]GPUInfo{
	"0": {UUID: "GPU-00000000-0000-4000-8000-000000000000"},
	"GPU-00000000-0000-4000-8000-000000000000": {UUID: "GPU-00000000-0000-4000-8000-000000000000"},
	"1": {UUID: "GPU-11111111-0000-4000-8000-000000000000"},
	"GPU-11111111-0000-4000-8000-000000000000": {UUID: "GPU-11111111-0000-4000-8000-000000000000"},
	"MIG-11111111-0000-4000-8000-0000000000a1": {UUID: "MIG-11111111-0000-4000-8000-0000000000a1", Parent: "GPU-11111111-0000-4000-8000-000000000000"},
	"MIG-11111111-0000-4000-8000-0000000000a2": {UUID: "MIG-11111111-0000-4000-8000-0000000000a2", Parent: "GPU-11111111-0000-4000-8000-000000000000"},
}

func fakeGPU(dev string) (GPUInfo, error) {
	if g, ok := fakeGPUs[dev]; ok {
		return g, nil
	}
	return GPUInfo{}, fmt.Errorf("GPU %q is not on this host", dev)
}

// hostDir is a directory every user may enter, with an engine binary
// (0755), a model (0644), and what the case adds.
func hostDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for d := dir; d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
		require.NoError(t, os.Chmod(d, 0o755))
	}
	require.NoError(t, os.WriteFile(filepath.Join(dir, "engine"), []byte("#!/bin/sh\n"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "m.gguf"), []byte("GGUF\x03\x00\x00\x00 m"), 0o644))
	return dir
}

// hostPool is a pool file on GPU dev with the engine and model of dir.
func hostPool(dir, dev string, port int, extra string) string {
	return fmt.Sprintf("[Pool]\nDevices=%s\nModel=%s/m.gguf\n[Engine]\nExecStart=%s/engine --model %%m --port %%p\nPort=%d\n%s", dev, dir, dir, port, extra)
}

// What a valid configuration would fail at when its pools start, each
// named by file and line.
func TestCheckHostFindsWhatFailsAtRunTime(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("makes files of other owners and checks them for nobody: needs root")
	}
	_, err := user.Lookup("nobody")
	require.NoError(t, err, "the nobody user")
	cases := []struct {
		name  string
		setup func(dir string)
		pools func(dir string) map[string]string
		want  []string // empty: no error
	}{
		{"all well", nil, func(dir string) map[string]string {
			return map[string]string{"a": hostPool(dir, "0", 8081, "User=nobody\n"), "b": hostPool(dir, "MIG-11111111-0000-4000-8000-0000000000a1", 8082, ""),
				"c": hostPool(dir, "MIG-11111111-0000-4000-8000-0000000000a2", 8083, "")}
		}, nil},
		{"one GPU by index and by UUID", nil, func(dir string) map[string]string {
			return map[string]string{"a": hostPool(dir, "0", 8081, ""), "b": hostPool(dir, "GPU-00000000-0000-4000-8000-000000000000", 8082, "")}
		}, []string{`b.pool:2: [Pool] Devices=: GPU "GPU-00000000-0000-4000-8000-000000000000" is GPU-00000000-0000-4000-8000-000000000000, which pool "a" names "0" (`}},
		{"a MIG device and its parent", nil, func(dir string) map[string]string {
			return map[string]string{"a": hostPool(dir, "1", 8081, ""), "b": hostPool(dir, "0 MIG-11111111-0000-4000-8000-0000000000a2", 8082, "")}
		}, []string{`b.pool:2: [Pool] Devices=: GPU "MIG-11111111-0000-4000-8000-0000000000a2" is a MIG device of GPU-11111111-0000-4000-8000-000000000000, which pool "a" takes whole as "1"`}},
		{"a parent after its MIG device", nil, func(dir string) map[string]string {
			return map[string]string{"a": hostPool(dir, "MIG-11111111-0000-4000-8000-0000000000a1", 8081, ""), "b": hostPool(dir, "GPU-11111111-0000-4000-8000-000000000000", 8082, "")}
		}, []string{`b.pool:2: [Pool] Devices=: GPU "GPU-11111111-0000-4000-8000-000000000000" is GPU-11111111-0000-4000-8000-000000000000, whose MIG device "MIG-11111111-0000-4000-8000-0000000000a1" pool "a" uses`}},
		{"a group shares a GPU by index and by UUID", nil, func(dir string) map[string]string {
			return map[string]string{"a": hostPool(dir, "0", 8081, "[Pool]\nGroup=g\n"), "b": hostPool(dir, "GPU-00000000-0000-4000-8000-000000000000", 8082, "[Pool]\nGroup=g\n")}
		}, nil},
		{"a group's members on a GPU and its MIG device", nil, func(dir string) map[string]string {
			return map[string]string{"a": hostPool(dir, "1", 8081, "[Pool]\nGroup=g\n"), "b": hostPool(dir, "MIG-11111111-0000-4000-8000-0000000000a1", 8082, "[Pool]\nGroup=g\n")}
		}, []string{`b.pool:2: [Pool] Devices=: MIG-11111111-0000-4000-8000-0000000000a1 names other GPUs than pool "a" of Group=g (`}},
		{"a GPU the host lacks", nil, func(dir string) map[string]string {
			return map[string]string{"a": hostPool(dir, "7", 8081, "")}
		}, []string{`a.pool:2: [Pool] Devices=: GPU "7" is not on this host`}},
		{"an unknown User=", nil, func(dir string) map[string]string {
			return map[string]string{"a": hostPool(dir, "0", 8081, "\nUser=no-such-engine-user\n")}
		}, []string{`a.pool:8: [Engine] User=: user "no-such-engine-user" does not exist on this host`}},
		{"a missing engine", nil, func(dir string) map[string]string {
			return map[string]string{"a": strings.Replace(hostPool(dir, "0", 8081, ""), dir+"/engine", dir+"/gone/engine", 1)}
		}, []string{"a.pool:5: [Engine] ExecStart=: ", "/gone/engine does not exist"}},
		{"an engine not in PATH", nil, func(dir string) map[string]string {
			return map[string]string{"a": strings.Replace(hostPool(dir, "0", 8081, ""), dir+"/engine", "no-such-engine-xyz", 1)}
		}, []string{"a.pool:5: [Engine] ExecStart=: no-such-engine-xyz is not in the engine's PATH (/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)"}},
		{"an engine from PATH", nil, func(dir string) map[string]string {
			return map[string]string{"a": strings.Replace(hostPool(dir, "0", 8081, "User=nobody\n"), dir+"/engine", "sh", 1)}
		}, nil},
		{"an engine its user may not execute", func(dir string) {
			require.NoError(t, os.Chmod(filepath.Join(dir, "engine"), 0o744))
		}, func(dir string) map[string]string {
			return map[string]string{"a": hostPool(dir, "0", 8081, "User=nobody\n"), "b": hostPool(dir, "1", 8082, "User=root\n")}
		}, []string{"a.pool:5: [Engine] ExecStart=: ", "/engine is not executable by the engine's user nobody (uid "}},
		{"an engine behind a closed directory", func(dir string) {
			require.NoError(t, os.Mkdir(filepath.Join(dir, "closed"), 0o700))
			require.NoError(t, os.Rename(filepath.Join(dir, "engine"), filepath.Join(dir, "closed", "engine")))
			require.NoError(t, os.Symlink("closed/engine", filepath.Join(dir, "engine")))
		}, func(dir string) map[string]string {
			return map[string]string{"a": hostPool(dir, "0", 8081, "User=nobody\n")}
		}, []string{"a.pool:5: [Engine] ExecStart=: ", "/engine: the engine's user nobody (uid ", "may not enter " + "DIR/closed (mode 0700, owner 0, group 0)"}},
		{"a missing model", func(dir string) {
			require.NoError(t, os.Remove(filepath.Join(dir, "m.gguf")))
		}, func(dir string) map[string]string {
			return map[string]string{"a": hostPool(dir, "0", 8081, "User=nobody\n")}
		}, []string{"a.pool:3: [Pool] Model=: ", "m.gguf"}},
		{"a model its user may not read", func(dir string) {
			require.NoError(t, os.Chmod(filepath.Join(dir, "m.gguf"), 0o600))
		}, func(dir string) map[string]string {
			return map[string]string{"a": hostPool(dir, "0", 8081, "User=nobody\n")}
		}, []string{"a.pool:3: [Pool] Model=: ", "not found or not readable by the engine's user nobody"}},
		{"a model a pool's own user may not read", func(dir string) {
			require.NoError(t, os.Chmod(filepath.Join(dir, "m.gguf"), 0o640))
		}, func(dir string) map[string]string {
			return map[string]string{"a": hostPool(dir, "0", 8081, "")}
		}, []string{"a.pool:3: [Pool] Model=: ", "not found or not readable by pool-engine-a (uid "}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := hostDir(t)
			if tc.setup != nil {
				tc.setup(dir)
			}
			files := map[string]string{}
			for id, data := range tc.pools(dir) {
				files["pools.d/"+id+".pool"] = data
			}
			c, err := Load(writeDir(t, files))
			require.NoError(t, err, "a valid configuration")
			errs := CheckHost(c, Host{GPU: fakeGPU})
			if len(tc.want) == 0 {
				assert.Empty(t, errs)
				return
			}
			require.NotEmpty(t, errs)
			for _, w := range tc.want {
				assert.Contains(t, errs.Error(), strings.ReplaceAll(w, "DIR", dir))
			}
			for _, e := range errs {
				assert.Positive(t, e.Line, "%s names its line", e)
			}
			assert.Len(t, errs, 1, "%s", errs)
		})
	}
}

// A value a drop-in set is named where the drop-in sets it.
func TestCheckHostNamesTheDropInThatSetTheValue(t *testing.T) {
	dir := hostDir(t)
	cfg := writeDir(t, map[string]string{"pools.d/a.pool": hostPool(dir, "0", 8081, "")})
	require.NoError(t, os.MkdirAll(filepath.Join(cfg, "pools.d", "a.pool.d"), 0o755))
	dropIn := filepath.Join(cfg, "pools.d", "a.pool.d", "50-Model.conf")
	require.NoError(t, os.WriteFile(dropIn, []byte("[Pool]\nModel="+dir+"/gone.gguf\n"), 0o644))
	c, err := Load(cfg)
	require.NoError(t, err)
	errs := CheckHost(c, Host{GPU: fakeGPU})
	require.Len(t, errs, 1, "%s", errs)
	assert.Equal(t, dropIn, errs[0].File)
	assert.Equal(t, 2, errs[0].Line)
	assert.Contains(t, errs[0].Error(), dropIn+":2: [Pool] Model=: ")
}

// A whole-pool problem is named at the line that set the key, a drop-in's
// included.
func TestAWholePoolErrorNamesTheDropInLine(t *testing.T) {
	cfg := writeDir(t, map[string]string{"pools.d/a.pool": minimalPool})
	require.NoError(t, os.MkdirAll(filepath.Join(cfg, "pools.d", "a.pool.d"), 0o755))
	dropIn := filepath.Join(cfg, "pools.d", "a.pool.d", "10-health.conf")
	require.NoError(t, os.WriteFile(dropIn, []byte("# slower probes\n[Health]\nTimeoutSec=9\n"), 0o644))
	_, err := Load(cfg)
	require.Error(t, err)
	assert.Contains(t, err.Error(), dropIn+":3: [Health] TimeoutSec=: 9s is longer than IntervalSec=")
}
