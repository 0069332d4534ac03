package model

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

const (
	stagePrefix = "sha256-"
	tmpPrefix   = ".tmp-"
)

// Staged is a model file staged for an engine.
type Staged struct {
	Source
	Digest string // "sha256:<hex>" of the content
	Path   string // the staged path to hand the engine
}

type dirLock struct {
	mu   sync.Mutex
	refs int
}

// lockDir serializes work on one staging directory, between Stage calls
// for the same content and between Stage and Prune.
func (s *Stager) lockDir(name string) (unlock func()) {
	s.mu.Lock()
	l := s.dirLocks[name]
	if l == nil {
		l = &dirLock{}
		s.dirLocks[name] = l
	}
	l.refs++
	s.mu.Unlock()
	l.mu.Lock()
	return func() {
		l.mu.Unlock()
		s.mu.Lock()
		if l.refs--; l.refs == 0 {
			delete(s.dirLocks, name)
		}
		s.mu.Unlock()
	}
}

// Stage resolves ref as Resolve does for the engine's user, computes its
// digest, checks it against want (when want is not empty) and returns the
// staged file stageDir/sha256-<hex>/<base name of the source>, beneath
// the staging directory that only root and the engines' group enter; the
// engine's user must be able to reach it there (an error says so, and
// how to fix it, if not). The staged file is a hard link of the source when the daemon
// may make one (same filesystem; the source's mode and owner stay as they
// are), else a copy verified against the digest, with the source's owner,
// group and read bits only. The operator's file is never modified.
//
// A directory is staged as stageDir/sha256-<hex>/<its base name>/, the
// same for each of its files (stageTree).
//
// Call it before every engine start: an unchanged source costs a few stats;
// a changed one (any of inode, size, mtime, ctime) is hashed again and
// staged under its new digest. Every problem with ref or want is a
// *RefError, found before anything is created.
func (s *Stager) Stage(ref, want string, engine User) (Staged, error) {
	// Pools staging one ref take turns: a hard link changes the source's
	// ctime under a concurrent read. Two refs of one file (a symlink) may
	// still meet: that is no change of content, and the other tries
	// again on the new version.
	unlock := s.lockDir("ref:" + ref)
	defer unlock()
	for tries := 1; ; tries++ {
		st, err := s.stage(ref, want, engine)
		if err == nil {
			if err := s.checkStaged(st, engine); err != nil {
				return Staged{}, err
			}
			return st, nil
		}
		if !errors.Is(err, errChanged) || tries == 3 {
			return st, err
		}
	}
}

// checkStaged makes sure the engine's user can reach what was staged for
// it: one that is not in the engines' group cannot.
func (s *Stager) checkStaged(st Staged, engine User) error {
	_, err := reach(st.Path, engine)
	if err == nil {
		return nil
	}
	if errors.Is(err, errUnreachable) {
		err = errors.New("not found or not readable")
	}
	return fmt.Errorf("stage model %q: %s cannot reach the staged model %s (%v): only root and the group %s may enter %s; "+
		"make the user a member of that group, and StateDir= a directory it may pass through",
		st.Ref, engine.describe(), st.Path, err, s.groupName(), s.stageDir)
}

// errChanged is the cause of a RefError for a source that changed while
// it was staged.
var errChanged = errors.New("the source changed")

func (s *Stager) stage(ref, want string, engine User) (Staged, error) {
	if want != "" && !ValidDigest(want) {
		return Staged{}, refErr(ref, "", nil,
			"malformed digest %q: want \"sha256:\" followed by 64 lower-case hex digits", want)
	}
	src, err := s.Resolve(ref, engine)
	if err != nil {
		return Staged{}, err
	}
	if src.dir {
		return s.stageTree(src, want, engine)
	}
	digest, err := s.Digest(src)
	if err != nil {
		return Staged{}, err
	}
	if want != "" && digest != want {
		return Staged{}, refErr(ref, src.Path, ErrDigestMismatch,
			"digest mismatch: want %s, the file has %s", want, digest)
	}

	dirName := stagePrefix + strings.TrimPrefix(digest, "sha256:")
	unlock := s.lockDir(dirName)
	defer unlock()
	dir := filepath.Join(s.stageDir, dirName)
	if err := s.ensureStageDir(); err != nil {
		return Staged{}, fmt.Errorf("stage model %q: %w", ref, err)
	}
	if err := mkdir0755(dir); err != nil {
		return Staged{}, fmt.Errorf("stage model %q: %w", ref, err)
	}
	staged := Staged{Source: src, Digest: digest, Path: filepath.Join(dir, filepath.Base(src.Path))}
	if s.isStaged(staged.Path, digest, src) {
		return staged, nil
	}
	if err := s.create(src, digest, staged.Path); err != nil {
		return Staged{}, err
	}
	return staged, nil
}

// isStaged reports whether path is a regular file whose version is one this
// Stager hashed (or wrote) with this digest, and is the source itself or a
// copy with the source's owner, group and read bits; anything else is
// re-created.
func (s *Stager) isStaged(path, digest string, src Source) bool {
	var st unix.Stat_t
	if unix.Lstat(path, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		return false
	}
	linked := uint64(st.Dev) == src.Dev && st.Ino == src.Ino
	copied := st.Uid == src.UID && st.Gid == src.GID && st.Mode&0o7777 == src.Mode&0o444
	if !linked && !copied {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.loadLocked()
	d, ok := s.lookupLocked(statKey(&st))
	return ok && d == digest
}

// create makes final atomically: a temporary name in the same directory,
// renamed over final once complete.
func (s *Stager) create(src Source, digest, final string) error {
	tmp, err := tmpName(final)
	if err != nil {
		return fmt.Errorf("stage model %q: %w", src.Ref, err)
	}
	var made fileKey // the version of tmp, as it was made
	linked, err := s.linkStaged(src, tmp)
	if err != nil {
		return err
	}
	if linked {
		made = src.key()
	} else if made, err = s.copyStaged(src, digest, tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, final); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("stage model %q: %w", src.Ref, err)
	}
	if err := syncDir(filepath.Dir(final)); err != nil {
		return fmt.Errorf("stage model %q: %w", src.Ref, err)
	}
	// Linking and renaming changed the file's ctime: record the version
	// now there, so the next start finds it without hashing.
	var st unix.Stat_t
	if err := unix.Lstat(final, &st); err != nil {
		return fmt.Errorf("stage model %q: %w", src.Ref, err)
	}
	if !sameContent(statKey(&st), made) {
		return refErr(src.Ref, src.Path, errChanged, "changed while it was being staged; try again")
	}
	s.mu.Lock()
	s.storeLocked(statKey(&st), final, digest)
	s.mu.Unlock()
	s.persist()
	return nil
}

// linkStaged hard-links the source at tmp. It reports false, without error,
// when a link is not possible here and a copy should be made instead: across
// filesystems, or (EPERM) another user's file when the daemon lacks
// CAP_FOWNER under fs.protected_hardlinks.
func (s *Stager) linkStaged(src Source, tmp string) (bool, error) {
	fd, err := s.pin(src)
	if err != nil {
		return false, err
	}
	defer unix.Close(fd)
	return s.linkFrom(src, fd, tmp)
}

// linkFrom is linkStaged for the source the O_PATH descriptor fd names.
func (s *Stager) linkFrom(src Source, fd int, tmp string) (bool, error) {
	if err := s.link(fdPath(fd), tmp); err != nil {
		if errors.Is(err, unix.EXDEV) || errors.Is(err, unix.EPERM) || errors.Is(err, unix.EMLINK) ||
			errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOTSUP) {
			return false, nil
		}
		return false, fmt.Errorf("stage model %q: %w", src.Ref, err)
	}
	var st unix.Stat_t
	if err := unix.Lstat(tmp, &st); err != nil {
		os.Remove(tmp)
		return false, fmt.Errorf("stage model %q: %w", src.Ref, err)
	}
	if !sameContent(statKey(&st), src.key()) {
		os.Remove(tmp)
		return false, refErr(src.Ref, src.Path, errChanged, "changed while it was being staged; try again")
	}
	return true, nil
}

// copyStaged copies the source to tmp, hashing what it copies, and keeps
// the copy only if that matches digest. The copy gets the source's owner
// and group and only its read bits: never more readable than the source.
func (s *Stager) copyStaged(src Source, digest, tmp string) (fileKey, error) {
	in, err := s.reopen(src)
	if err != nil {
		return fileKey{}, err
	}
	defer in.Close()
	return s.copyFrom(src, in, digest, tmp)
}

// copyFrom is copyStaged from in, the source opened for reading.
func (s *Stager) copyFrom(src Source, in *os.File, digest, tmp string) (_ fileKey, err error) {
	out, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fileKey{}, fmt.Errorf("stage model %q: %w", src.Ref, err)
	}
	defer func() {
		if out != nil {
			out.Close()
		}
		if err != nil {
			os.Remove(tmp)
		}
	}()
	h := s.newHash()
	n, err := io.CopyBuffer(io.MultiWriter(out, h), readerOnly{in}, make([]byte, bufSize))
	if err != nil {
		return fileKey{}, fmt.Errorf("stage model %q: copy to %s: %w", src.Ref, tmp, err)
	}
	if err := unchanged(in, src, n); err != nil {
		return fileKey{}, err
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != digest {
		return fileKey{}, refErr(src.Ref, src.Path, ErrDigestMismatch,
			"the copy does not match the digest: want %s, copied %s (the file changed without changing size or mtime?)",
			digest, got)
	}
	if err := out.Sync(); err != nil {
		return fileKey{}, fmt.Errorf("stage model %q: %w", src.Ref, err)
	}
	// chmod while the file is still ours, then give it away.
	if err := unix.Fchmod(int(out.Fd()), src.Mode&0o444); err != nil {
		return fileKey{}, fmt.Errorf("stage model %q: %w", src.Ref, err)
	}
	if err := unix.Fchown(int(out.Fd()), int(src.UID), int(src.GID)); err != nil {
		return fileKey{}, fmt.Errorf("stage model %q: cannot give the copy the source's owner %d and group %d "+
			"(copying another user's model across filesystems needs CAP_CHOWN): %w", src.Ref, src.UID, src.GID, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(out.Fd()), &st); err != nil {
		return fileKey{}, fmt.Errorf("stage model %q: %w", src.Ref, err)
	}
	if err := out.Close(); err != nil {
		out = nil
		return fileKey{}, fmt.Errorf("stage model %q: %w", src.Ref, err)
	}
	out = nil
	return statKey(&st), nil
}

func tmpName(final string) (string, error) {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	return filepath.Join(filepath.Dir(final), tmpPrefix+hex.EncodeToString(b[:])), nil
}

// EngineGroup is the group every engine's user is in (the package's
// sysusers.d creates it): it, and root, alone may enter the staging
// directory.
const EngineGroup = "pool-engine"

// stageDirMode lets the engines' group pass through the staging directory
// to a staged model whose name it knows, and nobody else in.
const stageDirMode = 0o710

// PrepareStageDir creates the staging directory, or sets an existing one
// right (an older installation's was 0755): the daemon's, the engines'
// group's, mode 0710. The daemon calls it on start; Stage does the same.
func (s *Stager) PrepareStageDir() error {
	if err := s.ensureStageDir(); err != nil {
		return fmt.Errorf("staging directory %s: %w", s.stageDir, err)
	}
	return nil
}

// stageGID is the staging directory's group: WithEngineGroup's, or
// EngineGroup's, looked up once.
func (s *Stager) stageGID() (uint32, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.engineGID != nil {
		return *s.engineGID, nil
	}
	g, err := user.LookupGroup(EngineGroup)
	if err != nil {
		return 0, fmt.Errorf("the engines' group %s (created by the package's sysusers.d): %w", EngineGroup, err)
	}
	gid, err := strconv.ParseUint(g.Gid, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("the engines' group %s has a non-numeric gid %q", EngineGroup, g.Gid)
	}
	v := uint32(gid)
	s.engineGID = &v
	return v, nil
}

// groupName names the staging directory's group in messages.
func (s *Stager) groupName() string {
	s.mu.Lock()
	gid := s.engineGID
	s.mu.Unlock()
	if gid == nil {
		return EngineGroup
	}
	if g, err := user.LookupGroupId(strconv.FormatUint(uint64(*gid), 10)); err == nil {
		return fmt.Sprintf("%s (gid %d)", g.Name, *gid)
	}
	return fmt.Sprintf("gid %d", *gid)
}

// ensureStageDir creates the staging directory if need be and gives it
// its owner, group and mode through a descriptor opened without following
// a symlink, whatever the umask and whatever it was before.
func (s *Stager) ensureStageDir() error {
	gid, err := s.stageGID()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(s.stageDir), 0o755); err != nil {
		return err
	}
	// Made private, opened up once it has its group.
	err = unix.Mkdir(s.stageDir, 0o700)
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return err
	}
	created := err == nil
	fd, err := unix.Open(s.stageDir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENOTDIR) {
		var st unix.Stat_t
		if unix.Lstat(s.stageDir, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFLNK {
			return fmt.Errorf("%s is a symbolic link: staged models are not written through one (set StateDir= to where they should live)", s.stageDir)
		}
		return fmt.Errorf("%s exists and is not a directory", s.stageDir)
	}
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	owner := uint32(os.Geteuid())
	if st.Uid != owner || st.Gid != gid {
		if err := unix.Fchown(fd, int(owner), int(gid)); err != nil {
			return fmt.Errorf("give it to uid %d and the engines' group (gid %d): %w", owner, gid, err)
		}
	}
	if st.Mode&0o7777 != stageDirMode {
		if err := unix.Fchmod(fd, stageDirMode); err != nil {
			return err
		}
	}
	if created {
		return syncDir(filepath.Dir(s.stageDir))
	}
	return nil
}

func mkdir0755(dir string) error {
	err := os.Mkdir(dir, 0o755)
	if err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	if err == nil {
		if err := os.Chmod(dir, 0o755); err != nil {
			return err
		}
		return syncDir(filepath.Dir(dir))
	}
	st, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	if st.Mode()&os.ModeSymlink != 0 {
		return fmt.Errorf("%s is a symbolic link: staged models are not written through one (set StateDir= to where they should live)", dir)
	}
	if !st.IsDir() {
		return fmt.Errorf("%s exists and is not a directory", dir)
	}
	if st.Mode().Perm() != 0o755 {
		return os.Chmod(dir, 0o755)
	}
	return nil
}

// Prune deletes staged files and staged trees that are not in keep (the
// staged paths engines still use), leftovers of interrupted stagings,
// staging directories left empty and the manifests of trees no longer
// staged. keep must include paths returned by Stage calls that are still
// in flight. It works only through descriptors opened without following
// symlinks, so it never deletes anything outside the staging directory: a
// symlink there is removed, never followed, and files Prune does not know
// (other names, directories inside the staging directory of a file model)
// are left alone.
func (s *Stager) Prune(keep []string) error {
	keepSet := make(map[string]bool, len(keep))
	for _, k := range keep {
		keepSet[filepath.Clean(k)] = true
	}
	root, err := unix.Open(s.stageDir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("prune staged models: %s: %w", s.stageDir, err)
	}
	dir := os.NewFile(uintptr(root), s.stageDir)
	defer dir.Close()
	entries, err := dir.ReadDir(-1)
	if err != nil {
		return fmt.Errorf("prune staged models: %w", err)
	}
	var errs []error
	var manifests []string
	for _, e := range entries {
		name := e.Name()
		switch {
		case e.IsDir() && isStageDirName(name):
			errs = append(errs, s.pruneDir(root, name, keepSet)...)
		case e.Type().IsRegular() && strings.HasSuffix(name, manifestSuffix) && isStageDirName(strings.TrimSuffix(name, manifestSuffix)):
			manifests = append(manifests, name)
		case e.Type().IsRegular() && strings.HasPrefix(name, tmpPrefix+cacheFileName):
			s.persistMu.Lock() // not a digests.json being written now
			if err := unix.Unlinkat(root, name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, err)
			}
			s.persistMu.Unlock()
		}
	}
	// A manifest goes with the last of its staged trees.
	for _, name := range manifests {
		errs = append(errs, s.pruneManifest(root, name)...)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("prune staged models: %w", err)
	}
	return nil
}

func (s *Stager) pruneDir(root int, name string, keep map[string]bool) []error {
	unlock := s.lockDir(name)
	defer unlock()
	dirPath := filepath.Join(s.stageDir, name)
	fd, err := unix.Openat(root, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return []error{fmt.Errorf("%s: %w", dirPath, err)}
	}
	dir := os.NewFile(uintptr(fd), dirPath)
	defer dir.Close()
	entries, err := dir.ReadDir(-1)
	if err != nil {
		return []error{err}
	}
	var errs []error
	left := 0
	changed := false
	// A directory is a staged tree where the digest is a directory
	// model's (its manifest is there), or a tree being made.
	var st unix.Stat_t
	trees := unix.Fstatat(root, name+manifestSuffix, &st, unix.AT_SYMLINK_NOFOLLOW) == nil
	for _, e := range entries {
		if keep[filepath.Join(dirPath, e.Name())] || e.IsDir() && !trees && !strings.HasPrefix(e.Name(), tmpPrefix) {
			left++
			continue
		}
		c, err := s.removeEntry(fd, e.Name(), 0)
		changed = changed || c
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", filepath.Join(dirPath, e.Name()), err))
			left++
		}
	}
	if left == 0 {
		if err := unix.Unlinkat(root, name, unix.AT_REMOVEDIR); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("%s: %w", dirPath, err))
		}
	}
	if changed {
		s.persist()
	}
	return errs
}

func (s *Stager) pruneManifest(root int, name string) []error {
	dirName := strings.TrimSuffix(name, manifestSuffix)
	unlock := s.lockDir(dirName)
	defer unlock()
	var st unix.Stat_t
	if err := unix.Fstatat(root, dirName, &st, unix.AT_SYMLINK_NOFOLLOW); !errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err := unix.Unlinkat(root, name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
		return []error{fmt.Errorf("%s: %w", filepath.Join(s.stageDir, name), err)}
	}
	return nil
}

// unlinkStaged removes one entry of a staging directory (a symlink itself,
// never its target) and keeps the digest cache right: a copy's digest is
// dead weight once it is gone, and a hard link's removal changes the ctime
// of the source it shares an inode with, which must not cost a re-hash.
func (s *Stager) unlinkStaged(dirfd int, name string) (changed bool, err error) {
	var before unix.Stat_t
	if err := unix.Fstatat(dirfd, name, &before, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return false, nil
		}
		return false, err
	}
	if before.Mode&unix.S_IFMT != unix.S_IFREG {
		return false, unix.Unlinkat(dirfd, name, 0)
	}
	pfd, err := unix.Openat(dirfd, name, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return false, err
	}
	defer unix.Close(pfd)
	if err := unix.Unlinkat(dirfd, name, 0); err != nil {
		return false, err
	}
	k := statKey(&before)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.loadLocked()
	c, ok := s.cache[k.fileID]
	if !ok || c.key() != k {
		return false, nil
	}
	var after unix.Stat_t
	if before.Nlink > 1 && unix.Fstat(pfd, &after) == nil && after.Nlink > 0 && sameContent(statKey(&after), k) {
		s.storeLocked(statKey(&after), c.Path, c.Digest)
	} else {
		delete(s.cache, k.fileID)
	}
	return true, nil
}

func isStageDirName(name string) bool {
	return strings.HasPrefix(name, stagePrefix) && ValidDigest("sha256:"+strings.TrimPrefix(name, stagePrefix))
}
