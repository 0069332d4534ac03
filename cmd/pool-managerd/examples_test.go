package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
)

// Every pool example the package ships (packaging/examples/pools.d/
// *.pool.example) passes --check-config as it stands, copied into
// pools.d beside the example manager file, with its model in ModelsDir=.
func TestShippedPoolExamplesPass(t *testing.T) {
	sandbox.Need(t)
	// The engines they name, on this host.
	for _, f := range []string{"/usr/bin/llama-server", "/opt/vllm/bin/vllm", "/opt/sglang/bin/python3", "/usr/bin/podman"} {
		hostFile(t, f)
	}
	// The podman example's user, a system user of its own (the sandbox's
	// root is an overlay).
	if exec.Command("id", "llama-podman").Run() != nil {
		out, err := exec.Command("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "llama-podman").CombinedOutput()
		require.NoError(t, err, "%s", out)
		t.Cleanup(func() { exec.Command("userdel", "llama-podman").Run() })
	}
	examples, err := filepath.Glob("../../packaging/examples/pools.d/*.pool.example")
	require.NoError(t, err)
	var names []string
	for _, ex := range examples {
		names = append(names, filepath.Base(ex))
	}
	assert.Subset(t, names, []string{"llama-server.pool.example", "vllm.pool.example", "sglang.pool.example", "llama-server-podman.pool.example"})

	got := map[string]*config.Pool{}
	for _, ex := range examples {
		id := strings.TrimSuffix(filepath.Base(ex), ".pool.example")
		t.Run(id, func(t *testing.T) {
			dir := t.TempDir()
			models := filepath.Join(dir, "models")
			for _, d := range []string{"pools.d", "pool-managerd.conf.d", "models"} {
				require.NoError(t, os.MkdirAll(filepath.Join(dir, d), 0o755))
			}
			copyFile(t, "../../packaging/examples/pool-managerd.conf", filepath.Join(dir, "pool-managerd.conf"))
			require.NoError(t, os.WriteFile(filepath.Join(dir, "pool-managerd.conf.d", "models.conf"), []byte("[Manager]\nModelsDir="+models+"\n[Inventory]\nBackend=static\n"), 0o644))
			copyFile(t, ex, filepath.Join(dir, "pools.d", id+".pool"))

			c, err := config.Load(dir)
			require.NoError(t, err)
			require.Len(t, c.Pools, 1)
			p := c.Pools[0]
			got[id] = p
			// The model it names: a GGUF file, or a directory in Hugging
			// Face layout.
			m := filepath.Join(models, p.Model)
			if strings.HasSuffix(p.Model, ".gguf") {
				require.NoError(t, os.WriteFile(m, []byte("GGUF\x03\x00\x00\x00 fake"), 0o644))
			} else {
				require.NoError(t, os.MkdirAll(m, 0o755))
				require.NoError(t, os.WriteFile(filepath.Join(m, "config.json"), []byte("{}"), 0o644))
				require.NoError(t, os.WriteFile(filepath.Join(m, "model.safetensors"), []byte("fake"), 0o644))
			}

			for d := dir; d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
				require.NoError(t, os.Chmod(d, 0o755), "the engine's user reaches the model")
			}
			var out, errb bytes.Buffer
			rc := run([]string{"--config-dir", dir, "--check-config"}, &out, &errb)
			require.Equal(t, exitOK, rc, errb.String())
			assert.Contains(t, out.String(), "pool "+id)
			assert.Contains(t, out.String(), m, "the model under ModelsDir=")
			assert.True(t, filepath.IsAbs(p.Engine.ExecStart[0]))
			assert.Contains(t, strings.Join(p.Engine.ExecStart, " "), "%m")
			assert.NotNil(t, p.Health.Warmup, "a warm-up request")
		})
	}

	if p := got["llama-server"]; assert.NotNil(t, p) {
		assert.Equal(t, "/usr/bin/llama-server", p.Engine.ExecStart[0])
		assert.Contains(t, p.Engine.ExecStart, "--metrics")
		assert.Equal(t, "http://127.0.0.1:%p/metrics", p.Health.ProgressURL)
		assert.Positive(t, p.Health.Stall)
		assert.Equal(t, &config.WarmupRequest{Method: "POST", Path: "/completion", Body: `{"prompt":"Hi","n_predict":1}`}, p.Health.Warmup)
	}
	if p := got["vllm"]; assert.NotNil(t, p) {
		assert.Equal(t, []string{"serve", "%m"}, p.Engine.ExecStart[1:3])
		assert.Equal(t, config.DeviceIDsIndex, p.Engine.DeviceIDs)
		assert.Equal(t, "http://127.0.0.1:%p/health", p.Engine.HealthURL)
		assert.Equal(t, "http://127.0.0.1:%p/metrics", p.Health.ProgressURL)
		assert.GreaterOrEqual(t, p.Health.StartTimeout.Seconds(), 600.0)
		assert.Equal(t, "/v1/completions", p.Health.Warmup.Path)
		require.Len(t, p.Engine.VersionCommand, 3)
		assert.Equal(t, "from importlib.metadata import version; print(version('vllm'))", p.Engine.VersionCommand[2])
	}
	if p := got["sglang"]; assert.NotNil(t, p) {
		assert.Equal(t, []string{"-m", "sglang.launch_server", "--model-path", "%m"}, p.Engine.ExecStart[1:5])
		assert.Equal(t, "http://127.0.0.1:%p/health", p.Engine.HealthURL)
		assert.Contains(t, p.Engine.ExecStart, "--enable-metrics")
	}
}

// The container example runs rootless podman inside the pool's scope the
// way the vm-test checks it (--cgroups=split in a delegated scope, the
// host's network for the probe, the host's UTS namespace under
// ProtectHostname=), and the drop-in it needs takes from the daemon's
// hardening only what podman needs: no capability, no other system call
// group, no other protection.
func TestThePodmanExampleAndItsDropIn(t *testing.T) {
	dir := t.TempDir()
	copyFile(t, "../../packaging/examples/pool-managerd.conf", filepath.Join(dir, "pool-managerd.conf"))
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "pools.d"), 0o755))
	copyFile(t, "../../packaging/examples/pools.d/llama-server-podman.pool.example", filepath.Join(dir, "pools.d", "p.pool"))
	c, err := config.Load(dir)
	require.NoError(t, err)
	require.Len(t, c.Pools, 1)
	p := c.Pools[0]
	assert.Equal(t, []string{"/usr/bin/podman", "--cgroup-manager=cgroupfs", "run", "--rm", "--cgroups=split"}, p.Engine.ExecStart[:5])
	for _, a := range []string{"--network=host", "--uts=host", "--replace"} {
		assert.Contains(t, p.Engine.ExecStart, a)
	}
	assert.Contains(t, p.Engine.ExecStart, "%m:/models/model.gguf:ro")
	require.Len(t, p.Scope, 1)
	assert.Equal(t, config.ScopeProperty{Key: "Delegate", Raw: "yes", Name: "Delegate", Value: true}, p.Scope[0])

	b, err := os.ReadFile("../../packaging/examples/pool-managerd.service.d/podman.conf")
	require.NoError(t, err)
	var keys []string
	for _, l := range strings.Split(string(b), "\n") {
		if l != "" && !strings.HasPrefix(l, "#") {
			keys = append(keys, l)
		}
	}
	assert.Equal(t, []string{"[Service]", "RestrictNamespaces=no", "SystemCallFilter=@mount", "ProtectControlGroups=no"}, keys)
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(to, b, 0o644))
}
