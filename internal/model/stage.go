package model

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
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
	Path   string // the staged, immutable path to hand the engine
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

// Stage resolves ref, computes its digest, checks it against want (when
// want is not empty) and returns the staged file
// stageDir/sha256-<hex>/<base name of the source>, mode 0444 in a 0755
// directory so an unprivileged engine can read it. The staged file is a hard
// link of the source when both are on one filesystem (the source's mode
// becomes 0444 too, as they are one inode), else a copy verified against the
// digest. Content staged before is reused. Every problem with ref or want is
// a *RefError, found before anything is created.
func (s *Stager) Stage(ref, want string) (Staged, error) {
	if want != "" && !ValidDigest(want) {
		return Staged{}, refErr(ref, "", nil,
			"malformed digest %q: want \"sha256:\" followed by 64 lower-case hex digits", want)
	}
	src, err := s.Resolve(ref)
	if err != nil {
		return Staged{}, err
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
	if s.isStaged(staged.Path, digest) {
		return staged, nil
	}
	if err := s.create(src, digest, staged.Path); err != nil {
		return Staged{}, err
	}
	return staged, nil
}

// isStaged reports whether path is a 0444 regular file whose version is one
// this Stager hashed (or wrote) with this digest; anything else is
// re-created.
func (s *Stager) isStaged(path, digest string) bool {
	var st unix.Stat_t
	if unix.Lstat(path, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFREG || st.Mode&0o7777 != 0o444 {
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
	linked, err := s.linkStaged(src, tmp)
	if err != nil {
		return err
	}
	if !linked {
		if err := s.copyStaged(src, digest, tmp); err != nil {
			return err
		}
	}
	if err := os.Rename(tmp, final); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("stage model %q: %w", src.Ref, err)
	}
	if err := syncDir(filepath.Dir(final)); err != nil {
		return fmt.Errorf("stage model %q: %w", src.Ref, err)
	}
	return nil
}

// linkStaged hard-links the source at tmp. It reports false, without error,
// when a link is not possible here and a copy should be made instead.
func (s *Stager) linkStaged(src Source, tmp string) (bool, error) {
	if err := s.link(src.Path, tmp); err != nil {
		if errors.Is(err, unix.EXDEV) || errors.Is(err, unix.EPERM) || errors.Is(err, unix.EMLINK) ||
			errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOTSUP) {
			return false, nil
		}
		return false, fmt.Errorf("stage model %q: %w", src.Ref, err)
	}
	// The link was made by path: make sure it is the version we hashed.
	var st unix.Stat_t
	if err := unix.Lstat(tmp, &st); err != nil {
		os.Remove(tmp)
		return false, fmt.Errorf("stage model %q: %w", src.Ref, err)
	}
	if statKey(&st) != src.key() {
		os.Remove(tmp)
		return false, refErr(src.Ref, src.Path, nil, "changed while it was being staged; try again")
	}
	if err := os.Chmod(tmp, 0o444); err != nil {
		// Not ours to chmod (or read-only): a copy is ours.
		os.Remove(tmp)
		return false, nil
	}
	return true, nil
}

// copyStaged copies the source to tmp, hashing what it copies, and keeps
// the copy only if that matches digest.
func (s *Stager) copyStaged(src Source, digest, tmp string) (err error) {
	in, err := s.reopen(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("stage model %q: %w", src.Ref, err)
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
		return fmt.Errorf("stage model %q: copy to %s: %w", src.Ref, tmp, err)
	}
	if err := unchanged(in, src, n); err != nil {
		return err
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != digest {
		return refErr(src.Ref, src.Path, ErrDigestMismatch,
			"the copy does not match the digest: want %s, copied %s (the file changed without changing size or mtime?)",
			digest, got)
	}
	if err := out.Chmod(0o444); err != nil {
		return fmt.Errorf("stage model %q: %w", src.Ref, err)
	}
	if err := out.Sync(); err != nil {
		return fmt.Errorf("stage model %q: %w", src.Ref, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(out.Fd()), &st); err != nil {
		return fmt.Errorf("stage model %q: %w", src.Ref, err)
	}
	if err := out.Close(); err != nil {
		out = nil
		return fmt.Errorf("stage model %q: %w", src.Ref, err)
	}
	out = nil
	// Record the copy, so isStaged knows it later without hashing it.
	s.mu.Lock()
	s.storeLocked(statKey(&st), filepath.Join(filepath.Dir(tmp), filepath.Base(src.Path)), digest)
	s.mu.Unlock()
	s.persist()
	return nil
}

func tmpName(final string) (string, error) {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	return filepath.Join(filepath.Dir(final), tmpPrefix+hex.EncodeToString(b[:])), nil
}

// ensureStageDir creates the staging directory, 0755 whatever the umask.
func (s *Stager) ensureStageDir() error {
	if st, err := os.Stat(s.stageDir); err == nil && st.IsDir() {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(s.stageDir), 0o755); err != nil {
		return err
	}
	return mkdir0755(s.stageDir)
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
	if !st.IsDir() {
		return fmt.Errorf("%s exists and is not a directory", dir)
	}
	if st.Mode().Perm() != 0o755 {
		return os.Chmod(dir, 0o755)
	}
	return nil
}

// Prune deletes staged files that are not in keep (the staged paths engines
// still use), leftovers of interrupted stagings, and staging directories
// left empty. keep must include paths returned by Stage calls that are
// still in flight. Files Prune does not know are left alone.
func (s *Stager) Prune(keep []string) error {
	keepSet := make(map[string]bool, len(keep))
	for _, k := range keep {
		keepSet[filepath.Clean(k)] = true
	}
	entries, err := os.ReadDir(s.stageDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("prune staged models: %w", err)
	}
	var errs []error
	for _, e := range entries {
		name := e.Name()
		switch {
		case e.IsDir() && isStageDirName(name):
			errs = append(errs, s.pruneDir(name, keepSet)...)
		case !e.IsDir() && strings.HasPrefix(name, tmpPrefix+cacheFileName):
			s.persistMu.Lock() // not a digests.json being written now
			if err := os.Remove(filepath.Join(s.stageDir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
			s.persistMu.Unlock()
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("prune staged models: %w", err)
	}
	return nil
}

func (s *Stager) pruneDir(name string, keep map[string]bool) []error {
	unlock := s.lockDir(name)
	defer unlock()
	dir := filepath.Join(s.stageDir, name)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return []error{err}
	}
	var errs []error
	left := 0
	forgot := false
	for _, e := range entries {
		p := filepath.Join(dir, e.Name())
		if keep[p] {
			left++
			continue
		}
		var st unix.Stat_t
		if unix.Lstat(p, &st) == nil && st.Nlink <= 1 {
			// A copy (or a link whose source is gone): its digest is dead weight.
			s.mu.Lock()
			s.loadLocked()
			if c, ok := s.cache[fileID{uint64(st.Dev), st.Ino}]; ok && c.key() == statKey(&st) {
				delete(s.cache, c.key().fileID)
				forgot = true
			}
			s.mu.Unlock()
		}
		if err := os.RemoveAll(p); err != nil {
			errs = append(errs, err)
			left++
		}
	}
	if left == 0 {
		if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if forgot {
		s.persist()
	}
	return errs
}

func isStageDirName(name string) bool {
	return strings.HasPrefix(name, stagePrefix) && ValidDigest("sha256:"+strings.TrimPrefix(name, stagePrefix))
}
