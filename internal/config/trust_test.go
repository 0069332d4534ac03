package config

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A pool file says what root runs: one that a group or everyone may write
// is refused, naming the file and its mode, and nothing is loaded.
func TestGroupWritablePoolFileIsRefusedWithItsPathAndMode(t *testing.T) {
	dir := writeDir(t, map[string]string{"pools.d/a.pool": minimalPool})
	f := filepath.Join(dir, PoolsDir, "a.pool")
	_, err := Load(dir)
	require.NoError(t, err)

	for _, mode := range []os.FileMode{0o664, 0o646, 0o666} {
		require.NoError(t, os.Chmod(f, mode))
		c, err := Load(dir)
		require.Error(t, err, "mode %04o", mode)
		assert.Nil(t, c)
		assert.Contains(t, err.Error(), f+": file is writable by others than root")
		assert.Contains(t, err.Error(), fmt.Sprintf("mode %04o", mode))
	}
}

// A pools.d everyone may write lets anyone add a pool file of their own:
// it is refused even while every file in it is sound.
func TestWorldWritablePoolsDirIsRefused(t *testing.T) {
	dir := writeDir(t, map[string]string{"pools.d/a.pool": minimalPool})
	pools := filepath.Join(dir, PoolsDir)
	require.NoError(t, os.Chmod(pools, 0o777))
	c, err := Load(dir)
	require.Error(t, err)
	assert.Nil(t, c)
	assert.Contains(t, err.Error(), pools+": directory is writable by others than root")
	assert.Contains(t, err.Error(), "mode 0777")

	// The sticky bit stops no one from adding a file.
	require.NoError(t, os.Chmod(pools, 0o777|os.ModeSticky))
	_, err = Load(dir)
	require.Error(t, err)
}

// The manager file and its drop-ins name commands root runs too
// (GPUResetCommand=): they and the drop-in directory get the same check.
func TestWritableManagerFileAndDropInsAreRefused(t *testing.T) {
	dir := writeDir(t, map[string]string{"pool-managerd.conf": "[Manager]\n"})
	dropDir := filepath.Join(dir, ManagerFile+".d")
	require.NoError(t, os.MkdirAll(dropDir, 0o755))
	drop := filepath.Join(dropDir, "x.conf")
	require.NoError(t, os.WriteFile(drop, []byte("[Manager]\n"), 0o644))
	_, err := Load(dir)
	require.NoError(t, err)

	for _, tc := range []struct {
		path string
		mode os.FileMode
		want string
	}{
		{filepath.Join(dir, ManagerFile), 0o664, ": file is writable"},
		{drop, 0o666, ": file is writable"},
		{dropDir, 0o775, ": directory is writable"},
	} {
		orig, err := os.Stat(tc.path)
		require.NoError(t, err)
		require.NoError(t, os.Chmod(tc.path, tc.mode))
		_, err = Load(dir)
		require.Error(t, err, tc.path)
		assert.Contains(t, err.Error(), tc.path+tc.want)
		require.NoError(t, os.Chmod(tc.path, orig.Mode().Perm()))
	}
	_, err = Load(dir)
	require.NoError(t, err)
}

// A pool file owned by another user is refused whatever its mode: that
// user may chmod it. Root and the daemon's own uid are the trusted owners
// (the daemon is root; tests and --check-config may run as a user).
func TestPoolFileOwnedByAnotherUserIsRefused(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chown needs root")
	}
	dir := writeDir(t, map[string]string{"pools.d/a.pool": minimalPool})
	f := filepath.Join(dir, PoolsDir, "a.pool")
	require.NoError(t, os.Chown(f, 65534, 65534))
	_, err := Load(dir)
	require.Error(t, err)
	assert.Contains(t, err.Error(), f+": file is writable by others than root (owner ")
	assert.Contains(t, err.Error(), "mode 0644")

	require.NoError(t, os.Chown(f, 0, 0))
	_, err = Load(dir)
	require.NoError(t, err)
}

// User=root is the operator's call: it loads (--check-config warns).
func TestUserRootLoads(t *testing.T) {
	dir := writeDir(t, map[string]string{"pools.d/a.pool": minimalPool + "User=root\n"})
	c, err := Load(dir)
	require.NoError(t, err)
	require.Len(t, c.Pools, 1)
	assert.Equal(t, "root", c.Pools[0].Engine.User)
}
