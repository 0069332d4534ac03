package config

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// dropInDir writes a drop-in of pool a under base/pools.d.
func writeDropIn(t *testing.T, base, name, content string) string {
	t.Helper()
	d := filepath.Join(base, PoolsDir, "a"+DropInSuffix)
	require.NoError(t, os.MkdirAll(d, 0o755))
	f := filepath.Join(d, name)
	require.NoError(t, os.WriteFile(f, []byte(content), 0o644))
	return f
}

// Drop-ins are read like systemd's: sorted by file name whatever their
// directory, a later value wins, a list key adds (empty clears), the
// runtime directory's file replaces the persistent one of the same name,
// and a link to /dev/null masks one.
func TestPoolDropInsApplyInNameOrder(t *testing.T) {
	run := t.TempDir()
	dir := writeDir(t, map[string]string{
		"pool-managerd.conf": "[Manager]\nRuntimeDir=" + run + "\n",
		"pools.d/a.pool":     minimalPool + "Environment=A=1\n",
	})
	e10 := writeDropIn(t, dir, "10-slots.conf", "[Pool]\nSlots=2\n[Engine]\nEnvironment=B=2\n")
	writeDropIn(t, dir, "50-AutoStart.conf", "[Pool]\nAutoStart=no\n")
	r50 := writeDropIn(t, run, "50-AutoStart.conf", "[Pool]\nAutoStart=yes\nSlots=5\n")
	e90 := writeDropIn(t, dir, "90-model.conf", "[Pool]\nModel=/models/other.gguf\n")
	masked := writeDropIn(t, dir, "95-masked.conf", "[Pool]\nSlots=9\n")
	require.NoError(t, os.Remove(masked))
	require.NoError(t, os.Symlink(os.DevNull, masked))
	// Neither a pool's nor a drop-in: ignored.
	writeDropIn(t, dir, "README", "not a drop-in")

	c, err := Load(dir)
	require.NoError(t, err)
	p := c.Pools[0]
	assert.Equal(t, []string{e10, r50, e90}, p.DropIns)
	assert.True(t, p.AutoStart, "the runtime drop-in replaces the persistent one of the same name")
	assert.Equal(t, uint32(5), p.Slots, "50- is read after 10-")
	assert.Equal(t, "/models/other.gguf", p.Model)
	assert.Equal(t, []string{"A=1", "B=2"}, p.Engine.Environment)

	// The running daemon's runtime directory is the one read.
	c, err = LoadRuntime(dir, t.TempDir())
	require.NoError(t, err)
	assert.False(t, c.Pools[0].AutoStart)
	assert.Equal(t, uint32(2), c.Pools[0].Slots)
}

// A bad line in a drop-in is reported against the drop-in, with its line.
func TestPoolDropInErrorsNameTheDropIn(t *testing.T) {
	dir := writeDir(t, map[string]string{"pools.d/a.pool": minimalPool})
	f := writeDropIn(t, dir, "20-bad.conf", "# mine\n[Pool]\nSlots=many\nColour=blue\n")
	g := writeDropIn(t, dir, "30-text.conf", "Slots=1\n")
	_, err := Load(dir)
	require.Error(t, err)
	assert.Contains(t, err.Error(), f+`:3: [Pool] Slots=: "many" is not an integer`)
	assert.Contains(t, err.Error(), f+":4: [Pool] Colour=: unknown key in [Pool]")
	assert.Contains(t, err.Error(), g+":1: text before the first [Section] header")
	assert.NotContains(t, err.Error(), "a.pool:")
}

// A drop-in directory or file others may write is refused like a pool
// file.
func TestWritableDropInIsRefused(t *testing.T) {
	dir := writeDir(t, map[string]string{"pools.d/a.pool": minimalPool})
	f := writeDropIn(t, dir, "10-x.conf", "[Pool]\nSlots=1\n")
	require.NoError(t, os.Chmod(f, 0o666))
	_, err := Load(dir)
	require.Error(t, err)
	assert.Contains(t, err.Error(), f+": file is writable by others than root")
	require.NoError(t, os.Chmod(f, 0o644))
	require.NoError(t, os.Chmod(filepath.Dir(f), 0o777))
	_, err = Load(dir)
	require.Error(t, err)
	assert.Contains(t, err.Error(), filepath.Dir(f)+": directory is writable by others than root")
}

// A value that would not read back as itself is never written: a newline
// would let a model ref add an ExecStart= of its own.
func TestDropInTextRefusesWhatWouldNotReadBack(t *testing.T) {
	text, err := DropInText("Pool", "Model", "/models/a b.gguf", "set by a test")
	require.NoError(t, err)
	assert.Equal(t, "# set by a test\n[Pool]\nModel=/models/a b.gguf\n", string(text))
	for _, v := range []string{"", "a.gguf\n[Engine]\nExecStart=/bin/sh", "a\rb", "a\tb", " a", "a ", `a\`, "\xff"} {
		_, err := DropInText("Pool", "Model", v, "x")
		assert.Error(t, err, "%q", v)
	}
}

// WriteDropIn writes through descriptors, atomically, 0644 in a 0755
// directory it makes; it follows no link and refuses a directory others
// may write.
func TestWriteDropIn(t *testing.T) {
	old := unixUmask(0o077)
	defer unixUmask(old)
	base := t.TempDir()
	require.NoError(t, os.Chmod(base, 0o755))
	pools := filepath.Join(base, PoolsDir)
	d := filepath.Join(pools, "a"+DropInSuffix)
	require.NoError(t, WriteDropIn(d, AutoStartDropIn, []byte("[Pool]\nAutoStart=no\n")))
	b, err := os.ReadFile(filepath.Join(d, AutoStartDropIn))
	require.NoError(t, err)
	assert.Equal(t, "[Pool]\nAutoStart=no\n", string(b))
	for f, mode := range map[string]os.FileMode{pools: 0o755 | os.ModeDir, d: 0o755 | os.ModeDir, filepath.Join(d, AutoStartDropIn): 0o644} {
		fi, err := os.Stat(f)
		require.NoError(t, err)
		assert.Equal(t, mode, fi.Mode(), f)
	}
	require.NoError(t, WriteDropIn(d, AutoStartDropIn, []byte("[Pool]\nAutoStart=yes\n")))
	ents, err := os.ReadDir(d)
	require.NoError(t, err)
	assert.Len(t, ents, 1, "no temporary file left")

	require.NoError(t, RemoveDropIn(d, AutoStartDropIn))
	require.NoError(t, RemoveDropIn(d, AutoStartDropIn), "a missing one is no error")
	require.NoError(t, RemoveDropIn(filepath.Join(pools, "b"+DropInSuffix), AutoStartDropIn))
	_, err = os.Stat(filepath.Join(d, AutoStartDropIn))
	assert.True(t, os.IsNotExist(err))

	// A link put where the drop-in directory goes is not followed.
	elsewhere := t.TempDir()
	link := filepath.Join(pools, "b"+DropInSuffix)
	require.NoError(t, os.Symlink(elsewhere, link))
	err = WriteDropIn(link, ModelDropIn, []byte("[Pool]\nModel=x\n"))
	require.Error(t, err)
	ents, _ = os.ReadDir(elsewhere)
	assert.Empty(t, ents)

	require.NoError(t, os.Chmod(d, 0o777))
	err = WriteDropIn(d, ModelDropIn, []byte("[Pool]\nModel=x\n"))
	require.ErrorContains(t, err, "directory is writable by others than root")

	for _, name := range []string{"../x.conf", ".hidden.conf", "x.txt", ""} {
		assert.Error(t, WriteDropIn(d, name, nil), name)
	}
	assert.True(t, strings.HasSuffix(d, ".pool.d"))
}

func unixUmask(m int) int { return syscall.Umask(m) }
