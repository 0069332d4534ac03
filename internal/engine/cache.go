package engine

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// EnsureCacheDir makes dir, a pool's cache directory, owned by uid:gid with
// mode 0700 if it is missing, and gives it to uid:gid when it is another's
// (the pool's user changed: User=, or a user of its own on a host where it
// ran as a shared one), with what the previous owner made in it. Its
// parent is made root's, 0755, when missing. The engine user owns dir and
// may have put anything there: dir is opened relative to its parent
// without following a symbolic link and changed through that descriptor
// only; inside, see giveTree.
func EnsureCacheDir(dir string, uid, gid uint32) error {
	parent, name := filepath.Dir(dir), filepath.Base(dir)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return fmt.Errorf("cache directory: %w", err)
	}
	pfd, err := unix.Open(parent, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("cache directory: open %s: %w", parent, err)
	}
	defer unix.Close(pfd)
	if err := unix.Mkdirat(pfd, name, 0o700); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("cache directory: mkdir %s: %w", dir, err)
	}
	fd, err := unix.Openat(pfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENOTDIR) {
		return fmt.Errorf("cache directory %s is not a directory (a symbolic link or another file, left as it is): remove it", dir)
	}
	if err != nil {
		return fmt.Errorf("cache directory: open %s: %w", dir, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("cache directory: stat %s: %w", dir, err)
	}
	if st.Uid == uid && st.Gid == gid {
		return nil
	}
	// The daemon may chown (CAP_CHOWN) but not chmod another's file (no
	// CAP_FOWNER): take it back, set the mode, then give it away.
	if st.Uid != 0 {
		if err := unix.Fchown(fd, 0, 0); err != nil {
			return fmt.Errorf("cache directory: chown %s: %w", dir, err)
		}
	}
	if err := unix.Fchmod(fd, 0o700); err != nil {
		return fmt.Errorf("cache directory: chmod %s: %w", dir, err)
	}
	if err := unix.Fchown(fd, int(uid), int(gid)); err != nil {
		return fmt.Errorf("cache directory: chown %s: %w", dir, err)
	}
	// What root made is never given away.
	if st.Uid == 0 {
		return nil
	}
	n := 0
	if err := giveTree(fd, dir, st.Uid, st.Gid, uid, gid, 0, &n); err != nil {
		return fmt.Errorf("cache directory %s: giving the previous user's files to uid %d: %w (remove it to start afresh)", dir, uid, err)
	}
	return nil
}

// Bounds of giveTree: a cache is deep and wide, not endless.
const (
	maxCacheDepth   = 64
	maxCacheEntries = 1 << 20
)

// giveTree gives what from inside dfd the previous owner (uid, gid from)
// owns to uid:gid, through descriptors: each entry is opened O_PATH without
// following a symbolic link, and checked and changed through that
// descriptor, so a name swapped meanwhile changes nothing else. Nothing of
// another owner is touched, nor a file with more than one link: a hard link
// into the cache may name a file elsewhere, which the new user must not get.
func giveTree(dfd int, path string, fromUID, fromGID, uid, gid uint32, depth int, n *int) error {
	if depth >= maxCacheDepth {
		return fmt.Errorf("%s: deeper than %d levels", path, maxCacheDepth)
	}
	d, err := unix.Openat(dfd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	f := os.NewFile(uintptr(d), path)
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	for _, name := range names {
		if *n++; *n > maxCacheEntries {
			return fmt.Errorf("more than %d entries", maxCacheEntries)
		}
		if err := giveEntry(dfd, name, filepath.Join(path, name), fromUID, fromGID, uid, gid, depth, n); err != nil {
			return err
		}
	}
	return nil
}

func giveEntry(dfd int, name, path string, fromUID, fromGID, uid, gid uint32, depth int, n *int) error {
	fd, err := unix.Openat(dfd, name, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	isDir := st.Mode&unix.S_IFMT == unix.S_IFDIR
	if st.Uid != fromUID || !isDir && st.Mode&unix.S_IFMT == unix.S_IFREG && st.Nlink > 1 {
		return nil
	}
	newGID := -1
	if st.Gid == fromGID {
		newGID = int(gid)
	}
	if err := unix.Fchownat(fd, "", int(uid), newGID, unix.AT_EMPTY_PATH); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if isDir {
		return giveTree(fd, path, fromUID, fromGID, uid, gid, depth+1, n)
	}
	return nil
}

// CacheEnv is the environment that puts an engine's caches in dir (its
// HOME, which the shim sets): XDG_CACHE_HOME, and under it the Hugging
// Face and vLLM caches, and Triton's where it keeps it under HOME. A
// variable set in env (the pool's Environment=) is left to it.
func CacheEnv(dir string, env []string) []string {
	vars := [][2]string{
		{"XDG_CACHE_HOME", ".cache"},
		{"HF_HOME", ".cache/huggingface"},
		{"VLLM_CACHE_ROOT", ".cache/vllm"},
		{"TRITON_CACHE_DIR", ".triton/cache"},
	}
	var out []string
	for _, v := range vars {
		if !setIn(env, v[0]) {
			out = append(out, v[0]+"="+filepath.Join(dir, v[1]))
		}
	}
	return out
}

func setIn(env []string, name string) bool {
	for _, e := range env {
		if strings.HasPrefix(e, name+"=") {
			return true
		}
	}
	return false
}
