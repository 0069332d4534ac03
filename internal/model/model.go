// Package model resolves, validates, hashes and stages the model files that
// inference engines load.
//
// Operators name a model by a ref: an absolute path, the same as a file://
// URL, or a plain name under the configured models directory. A ref is
// validated without reading its content (Resolve): it must lie beneath the
// models directory or another allowed model directory, with no symlink
// leading out, unless it is a pool file's own Model=; it must be a non-empty
// regular file (checked through an O_PATH descriptor, so a device or a FIFO
// is never opened for reading) that the engine's user (and a bus caller
// who is not root) could reach itself: every directory from / down
// searchable by that user, the file readable; a user who could not is
// told "not found or not readable" and nothing more. Content is hashed with sha256 once per file version (Digest, cached
// by device, inode, size, mtime and ctime and persisted across restarts),
// and staged (Stage) as a content-addressed file,
// stageDir/sha256-<hex>/<name>: a hard link of the source when possible,
// else a copy that is no more readable than the source. stageDir is
// mode 0710, root's and the engines' group's (EngineGroup): no other user
// enters it. The operator's file is never modified.
//
// A ref may also name a directory, a model in Hugging Face layout
// (config.json, *.safetensors, tokenizer files, maybe subdirectories). It
// is walked through descriptors (each entry opened O_PATH|O_NOFOLLOW
// relative to its directory's descriptor, its type checked before
// anything else): it may hold only regular files and directories, at most
// 1024 of them, at most 16 levels deep; a symlink inside it is refused
// wherever it points, and so is a FIFO, socket or device node. The engine's
// user must be able to read every file and list every directory. Its
// digest is the sha256 of its manifest, one line per file sorted by path
// in byte order:
//
//	<sha256 hex of the file> <size> <path beneath the directory>\n
//
// Each file's digest is cached as a file model's is, so a changed file is
// the only one hashed again; files are hashed in parallel. The directory
// is staged as stageDir/sha256-<hex>/<name>/, a tree of links (or copies)
// of its files built under a temporary name and renamed into place, with
// the manifest beside it as stageDir/sha256-<hex>.manifest: `sha256sum`
// of that file prints <hex>.
package model

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"net/url"
	"os"
	"os/user"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Stager resolves, hashes and stages model files. It is safe for concurrent
// use.
type Stager struct {
	modelsDir string
	modelDirs []string // further directories bus refs may resolve beneath
	stageDir  string

	// Hooks, replaced by tests only.
	// openFile opens name relative to dirfd; resolve != 0 means openat2 with
	// those RESOLVE_* flags. Tests make it fail with EACCES or ENOSYS (to run
	// the fallback).
	openFile func(dirfd int, name string, flags int, resolve uint64) (int, error)
	link     func(oldname, newname string) error // tests make it fail with EXDEV
	newHash  func() hash.Hash                    // tests count it

	engineGID *uint32 // the group of staged/; nil: EngineGroup's, looked up

	mu         sync.Mutex
	poolModels map[string]bool       // absolute paths pool files name as Model=
	loaded     bool                  // cache read from digests.json
	cache      map[fileID]cacheEntry // digests by file identity
	used       uint64                // LRU clock for cache entries
	flights    map[fileKey]*flight   // hashes in progress
	trees      map[*flight]bool      // directory digests in progress, for Hashing
	dirLocks   map[string]*dirLock   // staging directories in use

	persistMu sync.Mutex // serializes writes of digests.json
}

// Option configures a Stager.
type Option func(*Stager)

// WithModelDirs lets absolute refs resolve beneath dirs (absolute paths)
// as well as beneath the models directory.
func WithModelDirs(dirs ...string) Option {
	return func(s *Stager) {
		for _, d := range dirs {
			if d = filepath.Clean(d); !slices.Contains(s.modelDirs, d) {
				s.modelDirs = append(s.modelDirs, d)
			}
		}
	}
}

// WithEngineGroup makes gid the group that may enter the staging
// directory, instead of EngineGroup's.
func WithEngineGroup(gid uint32) Option {
	return func(s *Stager) { s.engineGID = &gid }
}

// New returns a Stager. Plain names resolve under modelsDir, which must be
// absolute. Staged files live under stageDir, created (or set right by
// PrepareStageDir) root's and the engines' group's, mode 0710, when first
// needed; the digest cache is persisted at stageDir/digests.json.
func New(modelsDir, stageDir string, opts ...Option) *Stager {
	s := &Stager{
		modelsDir:  filepath.Clean(modelsDir),
		stageDir:   filepath.Clean(stageDir),
		openFile:   sysOpen,
		link:       sysLink,
		newHash:    sha256.New,
		poolModels: map[string]bool{},
		cache:      map[fileID]cacheEntry{},
		flights:    map[fileKey]*flight{},
		trees:      map[*flight]bool{},
		dirLocks:   map[string]*dirLock{},
	}
	WithModelDirs(s.modelsDir)(s)
	for _, o := range opts {
		o(s)
	}
	return s
}

// SetPoolModels replaces the set of refs that pool files name as Model=
// (call it on every configuration load, so that a removed pool's model is
// no longer one). An absolute ref (or file:// URL) naming the same path as
// one of them may lie anywhere; any other must resolve beneath an allowed
// model directory. Plain names need no entry: they resolve beneath the
// models directory.
func (s *Stager) SetPoolModels(refs []string) {
	s.mu.Lock()
	s.poolModels = map[string]bool{}
	s.mu.Unlock()
	s.AddPoolModels(refs...)
}

// AddPoolModels adds refs to the set SetPoolModels replaces.
func (s *Stager) AddPoolModels(refs ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, ref := range refs {
		if p, ok := absPath(ref); ok {
			s.poolModels[p] = true
		}
	}
}

// absPath is the path an absolute or file:// ref names.
func absPath(ref string) (string, bool) {
	switch {
	case strings.HasPrefix(ref, "/"):
		return ref, true
	case strings.HasPrefix(strings.ToLower(ref), "file:"):
		p, err := filePath(ref)
		return p, err == nil
	}
	return "", false
}

// User is a credential a model is checked against: the account an engine
// runs as, or a bus caller. Group rights count for GID and Groups alike.
type User struct {
	Name     string
	UID, GID uint32
	Groups   []uint32 // supplementary groups
	Home     string
	Role     string // for messages: "the engine's user", "the caller"
}

// LookupUser resolves an engine's user through NSS. An answer is kept
// for userTTL: NSS may ask systemd itself (nss-systemd), and 64 pools
// restarting at once would ask it 64 times while it makes their scopes.
func LookupUser(name string) (User, error) {
	if name == "" {
		return User{}, errors.New("no engine user given")
	}
	users.mu.Lock()
	c, ok := users.m[name]
	users.mu.Unlock()
	if ok && time.Since(c.at) < userTTL {
		return c.u, nil
	}
	u, err := lookupUserNSS(name)
	if err != nil {
		return User{}, err
	}
	users.mu.Lock()
	if users.m == nil {
		users.m = map[string]cachedUser{}
	}
	users.m[name] = cachedUser{u: u, at: time.Now()}
	users.mu.Unlock()
	return u, nil
}

// userTTL bounds how long a changed account (its groups, its home) may go
// unseen by the next start.
const userTTL = 2 * time.Second

type cachedUser struct {
	u  User
	at time.Time
}

var users struct {
	mu sync.Mutex
	m  map[string]cachedUser
}

func lookupUserNSS(name string) (User, error) {
	u, err := user.Lookup(name)
	if err != nil {
		return User{}, fmt.Errorf("the engine's user %q: %w", name, err)
	}
	uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
	gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
	if err1 != nil || err2 != nil {
		return User{}, fmt.Errorf("the engine's user %q has a non-numeric uid %q or gid %q", name, u.Uid, u.Gid)
	}
	out := User{Name: name, UID: uint32(uid), GID: uint32(gid), Home: u.HomeDir, Role: "the engine's user"}
	ids, err := u.GroupIds()
	if err != nil {
		return User{}, fmt.Errorf("the groups of the engine's user %q: %w", name, err)
	}
	for _, g := range ids {
		if n, err := strconv.ParseUint(g, 10, 32); err == nil && uint32(n) != out.GID {
			out.Groups = append(out.Groups, uint32(n))
		}
	}
	return out, nil
}

// canRead reports whether u may read a file of this mode, owner and group
// by its permission bits, as the kernel decides (owner bits for the owner
// alone, then group bits, then other bits).
func (u User) canRead(mode, uid, gid uint32) bool {
	switch {
	case u.UID == 0:
		return true
	case uid == u.UID:
		return mode&0o400 != 0
	case u.inGroup(gid):
		return mode&0o040 != 0
	}
	return mode&0o004 != 0
}

// canList reports whether u may list and traverse a directory of this
// mode, owner and group (read and search bits), as the kernel decides.
func (u User) canList(mode, uid, gid uint32) bool {
	switch {
	case u.UID == 0:
		return true
	case uid == u.UID:
		return mode&0o500 == 0o500
	case u.inGroup(gid):
		return mode&0o050 == 0o050
	}
	return mode&0o005 == 0o005
}

// Source is a resolved, validated model: a file, or a directory of files.
type Source struct {
	Ref        string // as given
	Path       string // absolute path of the file (or directory) that was opened
	Size       int64  // a directory's: the total size of its files
	Dev        uint64
	Ino        uint64
	ModTime    time.Time
	ChangeTime time.Time // ctime: no write, chmod or chown goes without it
	Mode       uint32    // permission bits
	UID, GID   uint32    // owner

	// Files are a directory model's regular files, sorted by Rel (byte
	// order); nil for a file model.
	Files []TreeFile
	dir   bool
}

// IsDir reports whether the model is a directory.
func (src Source) IsDir() bool { return src.dir }

func (src Source) key() fileKey {
	return fileKey{fileID{src.Dev, src.Ino}, src.Size, src.ModTime.UnixNano(), src.ChangeTime.UnixNano()}
}

// Read-opens happen only on a descriptor whose type was checked, through
// /proc/self/fd; O_NONBLOCK all the same, so that nothing can block there.
const readFlags = unix.O_RDONLY | unix.O_CLOEXEC | unix.O_NOCTTY | unix.O_NONBLOCK

// pathFlags open without opening the file itself: a device's driver, a
// FIFO's other end never see an O_PATH open.
const pathFlags = unix.O_PATH | unix.O_CLOEXEC

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

// sysLink links the file a /proc/self/fd link names: exactly the inode that
// was checked, whatever its path now leads to.
func sysLink(oldname, newname string) error {
	return unix.Linkat(unix.AT_FDCWD, oldname, unix.AT_FDCWD, newname, unix.AT_SYMLINK_FOLLOW)
}

func fdPath(fd int) string { return "/proc/self/fd/" + strconv.Itoa(fd) }

// Resolve validates a ref without reading the file's content: where it
// resolves to, that each of readers (the engine's user, then maybe the
// bus caller) could reach it along its whole path, that it is a non-empty
// regular file; or, for a directory, that it holds only regular files and
// directories, within bounds, that those users can read and list (the
// package doc says more). Problems with the ref are *RefError. Nothing is
// said of a file a reader could not reach (its type, mode, owner, or
// whether it exists) but "not found or not readable by" that reader.
func (s *Stager) Resolve(ref string, readers ...User) (Source, error) {
	if len(readers) == 0 {
		return Source{}, fmt.Errorf("model %q: no user given to check it against", ref)
	}
	fd, path, err := s.locate(ref)
	if err != nil {
		return Source{}, hideFrom(readers, err)
	}
	defer unix.Close(fd)
	if err := checkReach(ref, path, fd, readers); err != nil {
		return Source{}, err
	}
	src, err := validate(ref, path, fd)
	if err != nil {
		return Source{}, err
	}
	if src.dir {
		return s.resolveTree(src, fd, readers)
	}
	return src, nil
}

// hideFrom turns an error of a lookup in the filesystem (the name does not
// exist, a symlink leads out, ...) into "not found or not readable" for a
// reader who could not have gone there: the daemon looks with root's eyes.
// Errors of the ref's own text say nothing of files and stay.
func hideFrom(readers []User, err error) error {
	var re *RefError
	if !errors.As(err, &re) || re.Err == nil || !filepath.IsAbs(re.Path) {
		return err
	}
	for _, u := range readers {
		if _, rerr := reach(re.Path, u); errors.Is(rerr, errUnreachable) {
			return unreachable(re.Ref, re.Path, u)
		}
	}
	return err
}

// Only "scheme://" makes a URL: "hf:llama.gguf" is a plain (if odd) name.
var urlSchemeRE = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9+.-]*://`)

// openPath resolves ref to an O_PATH descriptor and validates what it names
// by fstat, before anything opens it for reading.
func (s *Stager) openPath(ref string) (int, Source, error) {
	fd, path, err := s.locate(ref)
	if err != nil {
		return -1, Source{}, err
	}
	src, err := validate(ref, path, fd)
	if err != nil {
		unix.Close(fd)
		return -1, Source{}, err
	}
	return fd, src, nil
}

func (s *Stager) locate(ref string) (int, string, error) {
	if ref == "" {
		return -1, "", refErr(ref, "", nil, "ref is empty")
	}
	if strings.IndexByte(ref, 0) >= 0 {
		return -1, "", refErr(ref, "", nil, "ref contains a NUL byte")
	}
	var path string
	switch {
	case strings.HasPrefix(ref, "/"):
		path = ref
	case strings.HasPrefix(strings.ToLower(ref), "file:"):
		var err error
		if path, err = filePath(ref); err != nil {
			return -1, "", err
		}
	case urlSchemeRE.MatchString(ref):
		scheme := ref[:strings.Index(ref, ":")]
		return -1, "", refErr(ref, "", nil,
			"unsupported URL scheme %q: use an absolute path, a file:///path URL or a name under the models directory", scheme)
	default:
		if hasDotDot(ref) {
			return -1, "", refErr(ref, "", nil, `name contains a ".." element; names must stay under the models directory`)
		}
		if filepath.Clean(ref) == "." {
			return -1, "", refErr(ref, s.modelsDir, nil, "names the models directory itself, not a model in it")
		}
		if !filepath.IsAbs(s.modelsDir) {
			return -1, "", refErr(ref, "", nil,
				"cannot resolve a plain name: the models directory %q is not an absolute path", s.modelsDir)
		}
		return s.openBeneath(ref, s.modelsDir, ref)
	}

	s.mu.Lock()
	pool := s.poolModels[path]
	s.mu.Unlock()
	if pool {
		// A pool file's own words: its symlinks are followed.
		fd, err := s.openFile(unix.AT_FDCWD, path, pathFlags, unix.RESOLVE_NO_MAGICLINKS)
		if errors.Is(err, unix.ENOSYS) {
			fd, err = s.openFile(unix.AT_FDCWD, path, pathFlags, 0)
		}
		if err != nil {
			return -1, "", openErr(ref, path, err)
		}
		return fd, path, nil
	}
	if !hasDotDot(path) {
		clean := filepath.Clean(path)
		for _, dir := range s.modelDirs {
			if rel, ok := strings.CutPrefix(clean, strings.TrimSuffix(dir, "/")+"/"); ok && filepath.IsAbs(dir) {
				return s.openBeneath(ref, dir, rel)
			}
		}
	}
	return -1, "", refErr(ref, path, nil, "not beneath an allowed model directory (%s) and not a pool file's Model=",
		strings.Join(s.modelDirs, ", "))
}

func hasDotDot(p string) bool {
	return slices.Contains(strings.Split(p, "/"), "..")
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

// openBeneath opens rel under dir with O_PATH, refusing any resolution
// (symlinks included) that leaves dir.
func (s *Stager) openBeneath(ref, dir, rel string) (int, string, error) {
	path := filepath.Join(dir, rel)
	dirfd, err := s.openFile(unix.AT_FDCWD, dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, "", refErr(ref, path, err, "cannot open the model directory %s: %v", dir, err)
	}
	defer unix.Close(dirfd)
	fd, err := s.openFile(dirfd, rel, pathFlags, unix.RESOLVE_BENEATH|unix.RESOLVE_NO_MAGICLINKS)
	switch {
	case err == nil:
		return fd, path, nil
	case errors.Is(err, unix.ENOSYS):
		return s.openBeneathFallback(ref, dir, rel, path)
	case errors.Is(err, unix.EXDEV):
		return -1, "", refErr(ref, path, err,
			"escapes the model directory %s (through an absolute symlink, or a relative one leading outside it)", dir)
	}
	return -1, "", openErr(ref, path, err)
}

// openBeneathFallback is for kernels without openat2 (before 5.6): resolve
// every symlink, check the result is inside dir, open it without following
// a final symlink, then check the path the kernel reports for the open
// file, in case a directory was swapped in between.
func (s *Stager) openBeneathFallback(ref, dir, rel, path string) (int, string, error) {
	root, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return -1, "", refErr(ref, path, err, "cannot resolve the model directory %s: %v", dir, err)
	}
	real, err := filepath.EvalSymlinks(filepath.Join(root, rel))
	if err != nil {
		return -1, "", openErr(ref, path, err)
	}
	escapes := func(p string) *RefError {
		if within(root, p) {
			return nil
		}
		return refErr(ref, path, unix.EXDEV, "escapes the model directory %s (it resolves to %s)", dir, p)
	}
	if e := escapes(real); e != nil {
		return -1, "", e
	}
	fd, err := s.openFile(unix.AT_FDCWD, real, pathFlags|unix.O_NOFOLLOW, 0)
	if err != nil {
		return -1, "", openErr(ref, path, err)
	}
	p, err := os.Readlink(fdPath(fd))
	if err != nil {
		unix.Close(fd)
		return -1, "", refErr(ref, path, err, "cannot be checked: %v", err)
	}
	if e := escapes(p); e != nil {
		unix.Close(fd)
		return -1, "", e
	}
	return fd, path, nil
}

func within(root, p string) bool {
	return p == root || strings.HasPrefix(p, strings.TrimSuffix(root, "/")+"/")
}

// openErr explains a failed open.
func openErr(ref, path string, err error) *RefError {
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
	}
	return refErr(ref, path, err, "cannot be opened: %v", errno)
}

// validate checks what an O_PATH descriptor names.
func validate(ref, path string, fd int) (Source, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return Source{}, refErr(ref, path, err, "cannot be examined: %v", err)
	}
	isDir := st.Mode&unix.S_IFMT == unix.S_IFDIR
	if !isDir && st.Mode&unix.S_IFMT != unix.S_IFREG {
		return Source{}, refErr(ref, path, nil, "is not a regular file or a directory (it is %s)", kind(st.Mode))
	}
	if !isDir && st.Size == 0 {
		return Source{}, refErr(ref, path, nil, "is empty")
	}
	return Source{
		dir:        isDir,
		Ref:        ref,
		Path:       path,
		Size:       st.Size,
		Dev:        uint64(st.Dev),
		Ino:        st.Ino,
		ModTime:    time.Unix(st.Mtim.Sec, st.Mtim.Nsec),
		ChangeTime: time.Unix(st.Ctim.Sec, st.Ctim.Nsec),
		Mode:       st.Mode & 0o7777,
		UID:        st.Uid,
		GID:        st.Gid,
	}, nil
}

// pin opens the source again as an O_PATH descriptor, through the same
// rules as Resolve, and refuses it if it is no longer the version that was
// resolved.
func (s *Stager) pin(src Source) (int, error) {
	ref := src.Ref
	if ref == "" {
		ref = src.Path
	}
	fd, cur, err := s.openPath(ref)
	if err != nil {
		return -1, err
	}
	if cur.key() != src.key() {
		unix.Close(fd)
		return -1, refErr(src.Ref, src.Path, errChanged,
			"changed since it was resolved (size %d, mtime %s, ctime %s; now size %d, mtime %s, ctime %s)",
			src.Size, src.ModTime, src.ChangeTime, cur.Size, cur.ModTime, cur.ChangeTime)
	}
	return fd, nil
}

// reopen opens the pinned source for reading, through /proc/self/fd so that
// the inode read is the one checked, and makes sure of that.
func (s *Stager) reopen(src Source) (*os.File, error) {
	pfd, err := s.pin(src)
	if err != nil {
		return nil, err
	}
	defer unix.Close(pfd)
	return s.openRead(src, pfd)
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
