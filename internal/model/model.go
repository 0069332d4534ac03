// Package model resolves, validates, hashes and stages the model files that
// inference engines load.
//
// Operators name a model by a ref: an absolute path, the same as a file://
// URL, or a plain name under the configured models directory. A ref is
// validated without reading its content (Resolve), hashed with sha256 once
// per file version (Digest, cached by device, inode, size and mtime and
// persisted across restarts), and staged (Stage) as an immutable,
// content-addressed file, stageDir/sha256-<hex>/<name>, so the engine's
// file cannot change even if the operator later replaces the source.
package model

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Stager resolves, hashes and stages model files. It is safe for concurrent
// use.
type Stager struct {
	modelsDir string
	stageDir  string

	// Hooks, replaced by tests only.
	// openFile opens name relative to dirfd; resolve != 0 means openat2 with
	// those RESOLVE_* flags. Tests make it fail with EACCES (the tests run as
	// root, for whom no file is unreadable) or ENOSYS (to run the fallback).
	openFile func(dirfd int, name string, flags int, resolve uint64) (int, error)
	link     func(oldname, newname string) error // tests make it fail with EXDEV
	newHash  func() hash.Hash                    // tests count it

	mu       sync.Mutex
	loaded   bool                  // cache read from digests.json
	cache    map[fileID]cacheEntry // digests by file identity
	used     uint64                // LRU clock for cache entries
	flights  map[fileKey]*flight   // hashes in progress
	dirLocks map[string]*dirLock   // staging directories in use

	persistMu sync.Mutex // serializes writes of digests.json
}

// New returns a Stager. Plain names resolve under modelsDir, which must be
// absolute. Staged files live under stageDir, created 0755 when first
// needed; the digest cache is persisted at stageDir/digests.json.
func New(modelsDir, stageDir string) *Stager {
	return &Stager{
		modelsDir: filepath.Clean(modelsDir),
		stageDir:  filepath.Clean(stageDir),
		openFile:  sysOpen,
		link:      sysLink,
		newHash:   sha256.New,
		cache:     map[fileID]cacheEntry{},
		flights:   map[fileKey]*flight{},
		dirLocks:  map[string]*dirLock{},
	}
}

// Source is a resolved, validated model file.
type Source struct {
	Ref     string // as given
	Path    string // absolute path of the file that was opened
	Size    int64
	Dev     uint64
	Ino     uint64
	ModTime time.Time
}

func (src Source) key() fileKey {
	return fileKey{fileID{src.Dev, src.Ino}, src.Size, src.ModTime.UnixNano()}
}

// O_NONBLOCK so that a FIFO named as a model fails validation instead of
// blocking the open until a writer appears; it is a no-op on regular files.
const openFlags = unix.O_RDONLY | unix.O_CLOEXEC | unix.O_NOCTTY | unix.O_NONBLOCK

func sysOpen(dirfd int, name string, flags int, resolve uint64) (int, error) {
	for tries := 0; ; tries++ {
		var fd int
		var err error
		if resolve == 0 {
			fd, err = unix.Openat(dirfd, name, flags, 0)
		} else {
			fd, err = unix.Openat2(dirfd, name, &unix.OpenHow{Flags: uint64(flags), Resolve: resolve})
		}
		// openat2 with RESOLVE_BENEATH answers EAGAIN when a rename or mount
		// raced with the lookup; a retry is the documented answer.
		if err == unix.EINTR || (err == unix.EAGAIN && resolve != 0 && tries < 16) {
			continue
		}
		return fd, err
	}
}

// sysLink follows a final symlink, so a plain name that is a symlink inside
// the models directory stages the file, not the link.
func sysLink(oldname, newname string) error {
	return unix.Linkat(unix.AT_FDCWD, oldname, unix.AT_FDCWD, newname, unix.AT_SYMLINK_FOLLOW)
}

// Resolve validates a ref without reading the file's content: it opens the
// file for reading and checks what it opened is a non-empty regular file.
// Errors are *RefError.
func (s *Stager) Resolve(ref string) (Source, error) {
	f, src, err := s.open(ref)
	if err != nil {
		return Source{}, err
	}
	f.Close()
	return src, nil
}

// Only "scheme://" makes a URL: "hf:llama.gguf" is a plain (if odd) name.
var urlSchemeRE = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9+.-]*://`)

// open resolves ref, opens it for reading and validates the open file (by
// fstat, so what was validated is what is read).
func (s *Stager) open(ref string) (*os.File, Source, error) {
	if ref == "" {
		return nil, Source{}, refErr(ref, "", nil, "ref is empty")
	}
	if strings.IndexByte(ref, 0) >= 0 {
		return nil, Source{}, refErr(ref, "", nil, "ref contains a NUL byte")
	}
	var (
		fd   int
		path string
		err  error
	)
	switch {
	case strings.HasPrefix(ref, "/"):
		path = ref
		fd, err = s.openFile(unix.AT_FDCWD, path, openFlags, 0)
		if err != nil {
			return nil, Source{}, openErr(ref, path, unix.AT_FDCWD, path, err)
		}
	case strings.HasPrefix(strings.ToLower(ref), "file:"):
		path, err = filePath(ref)
		if err != nil {
			return nil, Source{}, err
		}
		fd, err = s.openFile(unix.AT_FDCWD, path, openFlags, 0)
		if err != nil {
			return nil, Source{}, openErr(ref, path, unix.AT_FDCWD, path, err)
		}
	case urlSchemeRE.MatchString(ref):
		scheme := ref[:strings.Index(ref, ":")]
		return nil, Source{}, refErr(ref, "", nil,
			"unsupported URL scheme %q: use an absolute path, a file:///path URL or a name under the models directory", scheme)
	default:
		fd, path, err = s.openBeneath(ref)
		if err != nil {
			return nil, Source{}, err
		}
	}
	f := os.NewFile(uintptr(fd), path)
	src, err := validate(ref, path, f)
	if err != nil {
		f.Close()
		return nil, Source{}, err
	}
	return f, src, nil
}

// filePath turns a file: URL into the absolute path it names.
func filePath(ref string) (string, error) {
	u, err := url.Parse(ref)
	if err != nil {
		return "", refErr(ref, "", err, "malformed file URL: %v", errors.Unwrap(err))
	}
	switch {
	case u.Opaque != "":
		return "", refErr(ref, "", nil, "file URL has a relative path; write file:///absolute/path")
	case u.Host != "" && (u.Path == "" || u.Path == "/"):
		return "", refErr(ref, "", nil,
			"file URL has no absolute path (%q is read as a host name); write file:///absolute/path", u.Host)
	case u.Host != "" || u.User != nil:
		return "", refErr(ref, "", nil,
			"file URL has a host part %q; only local files are supported: write file:///absolute/path", u.Host)
	case u.RawQuery != "" || u.ForceQuery || u.Fragment != "":
		return "", refErr(ref, "", nil,
			`file URL has a query or fragment; percent-encode "?" as %%3F and "#" as %%23 in file names`)
	case u.Path == "":
		return "", refErr(ref, "", nil, "file URL has no path; write file:///absolute/path")
	case !strings.HasPrefix(u.Path, "/"):
		return "", refErr(ref, "", nil, "file URL has a relative path; write file:///absolute/path")
	case strings.IndexByte(u.Path, 0) >= 0:
		return "", refErr(ref, "", nil, "file URL path contains a NUL byte")
	}
	return u.Path, nil
}

// openBeneath opens a plain name under the models directory, refusing any
// resolution (symlinks included) that leaves it.
func (s *Stager) openBeneath(name string) (int, string, error) {
	for _, el := range strings.Split(name, "/") {
		if el == ".." {
			return -1, "", refErr(name, "", nil, `name contains a ".." element; names must stay under the models directory`)
		}
	}
	if !filepath.IsAbs(s.modelsDir) {
		return -1, "", refErr(name, "", nil,
			"cannot resolve a plain name: the models directory %q is not an absolute path", s.modelsDir)
	}
	path := filepath.Join(s.modelsDir, name)
	dirfd, err := s.openFile(unix.AT_FDCWD, s.modelsDir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, "", refErr(name, path, err, "cannot open the models directory %s: %v", s.modelsDir, err)
	}
	defer unix.Close(dirfd)
	fd, err := s.openFile(dirfd, name, openFlags, unix.RESOLVE_BENEATH|unix.RESOLVE_NO_MAGICLINKS)
	switch {
	case err == nil:
		return fd, path, nil
	case errors.Is(err, unix.ENOSYS):
		return s.openBeneathFallback(name, path)
	case errors.Is(err, unix.EXDEV):
		return -1, "", refErr(name, path, err,
			"escapes the models directory %s (through an absolute symlink, or a relative one leading outside it)", s.modelsDir)
	}
	return -1, "", openErr(name, path, dirfd, name, err)
}

// openBeneathFallback is for kernels without openat2 (before 5.6): resolve
// every symlink, check the result is inside the models directory, open it
// without following a final symlink, then check the path the kernel reports
// for the open file, in case a directory was swapped in between.
func (s *Stager) openBeneathFallback(name, path string) (int, string, error) {
	root, err := filepath.EvalSymlinks(s.modelsDir)
	if err != nil {
		return -1, "", refErr(name, path, err, "cannot resolve the models directory %s: %v", s.modelsDir, err)
	}
	real, err := filepath.EvalSymlinks(filepath.Join(root, name))
	if err != nil {
		return -1, "", openErr(name, path, unix.AT_FDCWD, path, err)
	}
	escapes := func(p string) *RefError {
		if within(root, p) {
			return nil
		}
		return refErr(name, path, unix.EXDEV, "escapes the models directory %s (it resolves to %s)", s.modelsDir, p)
	}
	if e := escapes(real); e != nil {
		return -1, "", e
	}
	fd, err := s.openFile(unix.AT_FDCWD, real, openFlags|unix.O_NOFOLLOW, 0)
	if err != nil {
		return -1, "", openErr(name, path, unix.AT_FDCWD, real, err)
	}
	if p, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd)); err == nil {
		if e := escapes(p); e != nil {
			unix.Close(fd)
			return -1, "", e
		}
	}
	return fd, path, nil
}

func within(root, p string) bool {
	return p == root || strings.HasPrefix(p, strings.TrimSuffix(root, "/")+"/")
}

// openErr explains a failed open. dirfd and name locate the file again for
// ENXIO, the answer to opening a socket.
func openErr(ref, path string, dirfd int, name string, err error) *RefError {
	var errno unix.Errno
	if !errors.As(err, &errno) {
		return refErr(ref, path, err, "cannot be opened: %v", err)
	}
	switch errno {
	case unix.ENOENT:
		return refErr(ref, path, err, "does not exist")
	case unix.ENOTDIR:
		return refErr(ref, path, err, "does not exist (a component of the path is not a directory)")
	case unix.EACCES, unix.EPERM:
		return refErr(ref, path, err, "is not readable: %v", errno)
	case unix.ELOOP:
		return refErr(ref, path, err, "cannot be opened: too many levels of symbolic links, or a /proc magic link")
	case unix.ENXIO, unix.ENODEV:
		var st unix.Stat_t
		if unix.Fstatat(dirfd, name, &st, 0) == nil && st.Mode&unix.S_IFMT != unix.S_IFREG {
			return refErr(ref, path, err, "is not a regular file (it is %s)", kind(st.Mode))
		}
	}
	return refErr(ref, path, err, "cannot be opened: %v", errno)
}

func validate(ref, path string, f *os.File) (Source, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return Source{}, refErr(ref, path, err, "cannot be examined: %v", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return Source{}, refErr(ref, path, nil, "is not a regular file (it is %s)", kind(st.Mode))
	}
	if st.Size == 0 {
		return Source{}, refErr(ref, path, nil, "is empty")
	}
	return Source{
		Ref:     ref,
		Path:    path,
		Size:    st.Size,
		Dev:     uint64(st.Dev),
		Ino:     st.Ino,
		ModTime: time.Unix(st.Mtim.Sec, st.Mtim.Nsec),
	}, nil
}

func kind(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFDIR:
		return "a directory"
	case unix.S_IFIFO:
		return "a named pipe"
	case unix.S_IFSOCK:
		return "a socket"
	case unix.S_IFCHR:
		return "a character device"
	case unix.S_IFBLK:
		return "a block device"
	case unix.S_IFLNK:
		return "a symbolic link"
	}
	return fmt.Sprintf("of type %#o", mode&unix.S_IFMT)
}
