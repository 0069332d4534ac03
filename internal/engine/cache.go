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
// (the pool's User= changed). Its parent is made root's, 0755, when
// missing. The engine user owns dir and may have put anything there: dir
// is opened relative to its parent without following a symbolic link and
// changed through that descriptor only, and nothing inside it is touched.
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
