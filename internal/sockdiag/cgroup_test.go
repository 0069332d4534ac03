package sockdiag

import (
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// The cgroup v2 hierarchy is found wherever it is mounted: /sys/fs/cgroup
// (unified), /sys/fs/cgroup/unified (hybrid), a path with a space, or a
// namespace's subtree; v1 mounts are not it.
func TestCgroup2MountIsFoundInMountinfo(t *testing.T) {
	for _, c := range []struct {
		line      string
		root, mnt string
		ok        bool
	}{
		{"35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate", "/", "/sys/fs/cgroup", true},
		{"36 25 0:31 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw", "/", "/sys/fs/cgroup/unified", true},
		{"37 25 0:32 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd", "", "", false},
		{`38 25 0:31 /ns\040a /mnt/cg\040two rw - cgroup2 none rw`, "/ns a", "/mnt/cg two", true},
		{"39 25 0:31 / /mnt/x rw - cgroup2fs x rw", "", "", false},
		{"garbage", "", "", false},
	} {
		root, mnt, ok := cgroup2Mount(c.line)
		assert.Equal(t, c.ok, ok, c.line)
		assert.Equal(t, c.root, root, c.line)
		assert.Equal(t, c.mnt, mnt, c.line)
	}
}

// A process's cgroup id read from its pid is the id of its cgroup's
// directory; the file handle and the inode number agree on this 64-bit
// host; bad input is an error.
func TestCgroupIDOfThisProcess(t *testing.T) {
	b, err := os.ReadFile("/proc/self/cgroup")
	require.NoError(t, err)
	var path string
	for _, l := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(l, "0::"); ok {
			path = p
		}
	}
	if path == "" {
		t.Skip("no cgroup v2 hierarchy on this host")
	}
	byPid, err := CgroupID(os.Getpid())
	require.NoError(t, err)
	byPath, err := CgroupIDOfPath(path)
	require.NoError(t, err)
	assert.Equal(t, byPath, byPid)
	assert.NotZero(t, byPid)

	dir, err := cgroupDir(path)
	require.NoError(t, err)
	var st unix.Stat_t
	require.NoError(t, unix.Stat(dir, &st))
	assert.Equal(t, st.Ino, byPid, "kernfs inode number = cgroup id on 64-bit")

	for _, bad := range []string{"", "relative", "/a/../b", "/a/", "/no-such-cgroup-here"} {
		_, err := CgroupIDOfPath(bad)
		assert.Error(t, err, bad)
	}
	_, err = CgroupID(0)
	assert.Error(t, err)
	_, err = CgroupID(-1)
	assert.Error(t, err)
}
