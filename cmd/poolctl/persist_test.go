package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// dropIns are the lines of the *.conf files beneath dir.
func dropIns(t *testing.T, dir string) string {
	t.Helper()
	var all strings.Builder
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasSuffix(p, ".conf") && strings.Contains(p, ".pool.d/") {
			b, _ := os.ReadFile(p)
			all.WriteString(p + ":\n" + string(b))
		}
		return nil
	})
	return all.String()
}

// daemon-reload answers once the configuration is applied and fails with
// the reasons when it is refused; enable and disable persist AutoStart=
// as drop-ins (under /run with --runtime) and --now starts or stops; a
// reload --runtime writes nothing that outlives the boot.
func TestDaemonReloadEnableDisableAndRuntimeReload(t *testing.T) {
	dir := daemon(t)

	r := poolctl(t, "", "daemon-reload")
	assert.Equal(t, result{"", "", 0}, r)
	broken := filepath.Join(dir, "pools.d", "broken.pool")
	require.NoError(t, os.WriteFile(broken, []byte("[Pool]\nFrobnicate=yes\n"), 0o644))
	r = poolctl(t, "", "daemon-reload")
	assert.Equal(t, 1, r.code, r.stdout)
	assert.Regexp(t, `^poolctl: org\.llorch\.PoolManager1\.Error\.InvalidArgument: `, r.stderr)
	assert.Contains(t, r.stderr, "broken.pool")
	t.Logf("poolctl daemon-reload of a broken file:\n%s", r.stderr)
	assert.Equal(t, "b true", prop("llama-8b", "Ready"), "the running configuration stays")
	require.NoError(t, os.Remove(broken))
	r = poolctl(t, "", "daemon-reload", "--json")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Equal(t, "{\n  \"warnings\": []\n}\n", r.stdout)

	r = poolctl(t, "", "disable", "qwen", "--now")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Equal(t, `s "stopped"`, prop("qwen", "State"))
	assert.Contains(t, dropIns(t, filepath.Join(dir, "pools.d")), "AutoStart=no")
	out, err := exec.Command("systemctl", "restart", "pool-managerd.service").CombinedOutput()
	require.NoError(t, err, "%s", out)
	waitProp(t, "llama-8b", "Ready", "b true")
	assert.Equal(t, `s "stopped"`, prop("qwen", "State"), "disabled across a daemon restart")
	r = poolctl(t, "", "enable", "--now", "qwen")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Equal(t, "b true", prop("qwen", "Ready"))
	assert.Contains(t, dropIns(t, filepath.Join(dir, "pools.d")), "AutoStart=yes")

	r = poolctl(t, "", "disable", "--runtime", "llama-8b")
	require.Equal(t, 0, r.code, r.stderr)
	assert.NotContains(t, dropIns(t, filepath.Join(dir, "pools.d")), "llama-8b.pool.d")
	assert.Contains(t, dropIns(t, filepath.Join(dir, "run")), "AutoStart=no")
	assert.Equal(t, "b true", prop("llama-8b", "Ready"), "without --now it keeps running")

	r = poolctl(t, "", "reload", "llama-8b", "b.gguf", "--runtime", "--deadline", "5s")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Regexp(t, `(?m)^reload llama-8b: reloaded b\.gguf in `, r.stdout)
	assert.NotContains(t, dropIns(t, filepath.Join(dir, "pools.d")), "Model=")
	assert.Contains(t, dropIns(t, filepath.Join(dir, "run")), "b.gguf")

	r = poolctl(t, viewer, "disable", "qwen")
	assert.Equal(t, 1, r.code)
	assert.Contains(t, r.stderr, "org.freedesktop.DBus.Error.AccessDenied")
}
