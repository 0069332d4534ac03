package config

import (
	"os"
	"os/user"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/model"
)

// A vLLM pool names a model directory (Hugging Face layout) as Model=,
// pinned by ModelDigest=: the configuration takes it, the stager stages
// the tree under that digest, and %m is the staged directory.
func TestDirectoryModel(t *testing.T) {
	// The engine's user passes through every directory to its model.
	root := t.TempDir()
	require.NoError(t, os.Chmod(filepath.Dir(root), 0o755))
	require.NoError(t, os.Chmod(root, 0o755))
	me, err := user.Current()
	require.NoError(t, err)
	engine, err := model.LookupUser(me.Username)
	require.NoError(t, err)
	dir := filepath.Join(root, "models", "Llama-3.1-8B-Instruct")
	for rel, content := range map[string]string{
		"config.json":                      `{"architectures": ["LlamaForCausalLM"]}`,
		"model-00001-of-00002.safetensors": "weights 1",
		"model-00002-of-00002.safetensors": "weights 2",
		"tokenizer.json":                   "{}",
		"original/params.json":             "{}",
	} {
		p := filepath.Join(dir, rel)
		require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		require.NoError(t, os.WriteFile(p, []byte(content), 0o644))
	}
	stager := model.New(filepath.Join(root, "models"), filepath.Join(root, "staged"), model.WithEngineGroup(engine.GID))
	src, err := stager.Resolve(dir, engine)
	require.NoError(t, err)
	digest, err := stager.Digest(src)
	require.NoError(t, err)

	c, err := Load(writeDir(t, map[string]string{"pools.d/llama.pool": `[Pool]
Devices=0
Model=` + dir + `/
ModelDigest=` + digest + `
[Engine]
ExecStart=/usr/bin/vllm serve %m --port %p
Port=8000
User=` + me.Username + `
`}))
	require.NoError(t, err)
	p := c.Pools[0]
	stager.SetPoolModels([]string{p.Model})
	require.Equal(t, me.Username, p.Engine.User)
	st, err := stager.Stage(p.Model, p.ModelDigest, engine)
	require.NoError(t, err)
	assert.True(t, st.IsDir())
	sp := p.Specifiers(st.Path)
	var argv []string
	for _, a := range p.Engine.ExecStart {
		argv = append(argv, sp.Expand(a))
	}
	assert.Equal(t, []string{"/usr/bin/vllm", "serve", st.Path, "--port", "8000"}, argv)
	assert.Equal(t, "Llama-3.1-8B-Instruct", filepath.Base(st.Path), "the served model keeps its name")
	data, err := os.ReadFile(filepath.Join(st.Path, "original", "params.json"))
	require.NoError(t, err)
	assert.Equal(t, "{}", string(data))
}
