package sockdiag

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrNoCgroup2 means the host has no cgroup v2 hierarchy (a pure v1
// host): cgroup ids do not exist there and only the uid check is left.
var ErrNoCgroup2 = errors.New("sockdiag: no cgroup v2 hierarchy mounted")

// CgroupID returns the id of the cgroup v2 cgroup the process is in (the
// "0::" line of /proc/PID/cgroup), the number the kernel reports as a
// socket's INET_DIAG_CGROUP_ID. A pid can exit and be reused: where the
// cgroup's path is known (systemd's ControlGroup property of the scope),
// CgroupIDOfPath is free of that race.
func CgroupID(pid int) (uint64, error) {
	if pid <= 0 {
		return 0, fmt.Errorf("sockdiag: bad pid %d", pid)
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
	if err != nil {
		return 0, fmt.Errorf("sockdiag: cgroup of pid %d: %w", pid, err)
	}
	for line := range bytes.Lines(b) {
		if p, ok := bytes.CutPrefix(bytes.TrimRight(line, "\n"), []byte("0::")); ok {
			return CgroupIDOfPath(string(p))
		}
	}
	return 0, fmt.Errorf("sockdiag: pid %d: %w", pid, ErrNoCgroup2)
}

// CgroupIDOfPath returns the id of the cgroup v2 cgroup at path, as
// /proc/PID/cgroup and systemd's ControlGroup property name it (absolute
// within the hierarchy, e.g. /pool-managerd.slice/pool-engine-x.scope).
// It finds the hierarchy where it is mounted: /sys/fs/cgroup on a unified
// host, /sys/fs/cgroup/unified on a hybrid one.
func CgroupIDOfPath(p string) (uint64, error) {
	if !path.IsAbs(p) || path.Clean(p) != p {
		return 0, fmt.Errorf("sockdiag: cgroup path %q is not absolute and clean", p)
	}
	dir, err := cgroupDir(p)
	if err != nil {
		return 0, err
	}
	id, err := cgroupIDOfDir(dir)
	if err != nil {
		return 0, fmt.Errorf("sockdiag: cgroup %s: %w", p, err)
	}
	return id, nil
}

// cgroupIDOfDir reads the id the way the kernel documents it for
// bpf_get_current_cgroup_id and systemd reads it: the 8-byte kernfs file
// handle. Where name_to_handle_at is refused (a seccomp filter), the inode
// number is the same id on 64-bit kernels.
func cgroupIDOfDir(dir string) (uint64, error) {
	h, _, err := unix.NameToHandleAt(unix.AT_FDCWD, dir, 0)
	if err == nil {
		if b := h.Bytes(); len(b) == 8 {
			return binary.NativeEndian.Uint64(b), nil
		}
		return 0, fmt.Errorf("unexpected file handle of %d bytes (type %#x)", h.Size(), h.Type())
	}
	if !errors.Is(err, unix.ENOSYS) && !errors.Is(err, unix.EPERM) && !errors.Is(err, unix.EOPNOTSUPP) || strconv.IntSize != 64 {
		return 0, err
	}
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

// CgroupPathOfID returns the path in the cgroup v2 hierarchy (as
// /proc/PID/cgroup names it) of the cgroup with the given id: the id is
// the kernfs file handle, opened by handle on the hierarchy's mount, as
// systemd's cg_path_from_cgroupid does. It needs CAP_DAC_READ_SEARCH.
func CgroupPathOfID(id uint64) (string, error) {
	mnt, err := cgroupDir("/")
	if err != nil {
		return "", err
	}
	root, err := unix.Open(mnt, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", fmt.Errorf("sockdiag: %s: %w", mnt, err)
	}
	defer unix.Close(root)
	b := make([]byte, 8)
	binary.NativeEndian.PutUint64(b, id)
	// FILEID_KERNFS: the handle type of cgroup2 (kernfs) file handles.
	const fileIDKernfs = 0xfe
	fd, err := unix.OpenByHandleAt(root, unix.NewFileHandle(fileIDKernfs, b), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC)
	if err != nil {
		return "", fmt.Errorf("sockdiag: cgroup id %d: %w", id, err)
	}
	defer unix.Close(fd)
	dir, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	if err != nil {
		return "", fmt.Errorf("sockdiag: cgroup id %d: %w", id, err)
	}
	rel, ok := strings.CutPrefix(dir, mnt)
	if !ok {
		return "", fmt.Errorf("sockdiag: cgroup id %d is at %s, outside %s", id, dir, mnt)
	}
	if rel == "" {
		rel = "/"
	}
	return rel, nil
}

// CgroupDir maps a path in the cgroup v2 hierarchy (as /proc/PID/cgroup
// names it) to the directory where this process sees it: beneath
// /sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified on a hybrid one.
func CgroupDir(p string) (string, error) {
	if !path.IsAbs(p) || path.Clean(p) != p {
		return "", fmt.Errorf("sockdiag: cgroup path %q is not absolute and clean", p)
	}
	return cgroupDir(p)
}

// cgroupDir maps a path in the cgroup v2 hierarchy to the directory where
// this process sees it.
func cgroupDir(p string) (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", fmt.Errorf("sockdiag: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	for sc.Scan() {
		root, mnt, ok := cgroup2Mount(sc.Text())
		if !ok {
			continue
		}
		if root == "/" {
			return path.Join(mnt, p), nil
		}
		// A mount of a subtree (a cgroup namespace's view) serves only
		// paths beneath its root.
		if rel, ok := strings.CutPrefix(p, root); ok && (rel == "" || rel[0] == '/') {
			return path.Join(mnt, rel), nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("sockdiag: /proc/self/mountinfo: %w", err)
	}
	return "", ErrNoCgroup2
}

// cgroup2Mount returns the root and mount point of a mountinfo line of a
// cgroup2 file system.
func cgroup2Mount(line string) (root, mnt string, ok bool) {
	pre, post, found := strings.Cut(line, " - ")
	if !found || !strings.HasPrefix(post, "cgroup2 ") {
		return "", "", false
	}
	f := strings.Fields(pre)
	if len(f) < 5 {
		return "", "", false
	}
	return unescapeMountinfo(f[3]), unescapeMountinfo(f[4]), true
}

// unescapeMountinfo undoes the kernel's octal escapes (\040 for a space).
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
