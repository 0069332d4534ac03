package model

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Bounds of a model directory: a Hugging Face model has tens of files in
// one or two levels; these stop a ref from walking a whole filesystem.
const (
	maxTreeEntries = 1024 // files and directories, all levels together
	maxTreeDepth   = 16   // directory levels beneath the model directory
)

// manifestSuffix names the manifest of a staged directory model, beside its
// staging directory: stageDir/sha256-<hex>.manifest, whose own sha256 is
// <hex>.
const manifestSuffix = ".manifest"

// emptyDigest is the digest of no bytes: an empty file is never hashed.
var emptyDigest = func() string {
	sum := sha256.Sum256(nil)
	return "sha256:" + hex.EncodeToString(sum[:])
}()

// TreeFile is one regular file of a directory model.
type TreeFile struct {
	Rel        string // path beneath the model directory, "/"-separated
	Size       int64
	Dev, Ino   uint64
	ModTime    time.Time
	ChangeTime time.Time
	Mode       uint32
	UID, GID   uint32
}

// file is f as a Source of its own, for the checks and the cache a single
// file model has.
func (src Source) file(f TreeFile) Source {
	return Source{
		Ref: src.Ref, Path: filepath.Join(src.Path, f.Rel), Size: f.Size, Dev: f.Dev, Ino: f.Ino,
		ModTime: f.ModTime, ChangeTime: f.ChangeTime, Mode: f.Mode, UID: f.UID, GID: f.GID,
	}
}

func treeFile(rel string, st *unix.Stat_t) TreeFile {
	return TreeFile{
		Rel: rel, Size: st.Size, Dev: uint64(st.Dev), Ino: st.Ino,
		ModTime:    time.Unix(st.Mtim.Sec, st.Mtim.Nsec),
		ChangeTime: time.Unix(st.Ctim.Sec, st.Ctim.Nsec),
		Mode:       st.Mode & 0o7777, UID: st.Uid, GID: st.Gid,
	}
}

// Manifest is the canonical text whose sha256 is a directory model's
// digest: one line per regular file, sorted by relative path in byte order
// (LC_ALL=C sort), each
//
//	<sha256 hex of the file> <size in bytes, decimal> <path beneath the directory>\n
//
// with single spaces and "/" between path elements. Directories themselves
// (an empty one included) are not in it.
func Manifest(files []TreeFile, digests []string) []byte {
	var b strings.Builder
	for i, f := range files {
		b.WriteString(strings.TrimPrefix(digests[i], "sha256:"))
		b.WriteByte(' ')
		b.WriteString(strconv.FormatInt(f.Size, 10))
		b.WriteByte(' ')
		b.WriteString(f.Rel)
		b.WriteByte('\n')
	}
	return []byte(b.String())
}

func manifestDigest(manifest []byte) string {
	sum := sha256.Sum256(manifest)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// errStop ends a walk early, without an error of its own.
var errStop = errors.New("stop")

// treeWalk visits a directory model through descriptors only: each
// directory is listed through one opened relative to its own O_PATH
// descriptor, each entry is opened O_PATH|O_NOFOLLOW relative to its
// directory and its type checked by fstat before anything else happens to
// it. No path is resolved twice and no symlink is followed: a symlink
// anywhere inside is refused, wherever it points (a model directory holds
// regular files and directories only; copy what a link points to in).
type treeWalk struct {
	ref, path string // for messages: the ref and the directory's path
	users     []User // whose rights are checked; none: the daemon's own reads
	entries   int
	visit     func(rel string, fd int, st *unix.Stat_t) error
}

func (w *treeWalk) err(rel string, cause error, format string, args ...any) *RefError {
	return refErr(w.ref, w.path, cause, "contains %q, which "+format, append([]any{rel}, args...)...)
}

// walk lists the directory whose O_PATH descriptor is fd, rel beneath the
// top ("" for the top itself), depth levels down.
func (w *treeWalk) walk(fd int, rel string, depth int) error {
	lfd, err := unix.Openat(fd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return refErr(w.ref, w.path, err, "cannot be listed at %q: %v", rel+"/", err)
	}
	d := os.NewFile(uintptr(lfd), w.path)
	var names []string
	for {
		batch, err := d.Readdirnames(256)
		names = append(names, batch...)
		if w.entries+len(names) > maxTreeEntries {
			d.Close()
			return refErr(w.ref, w.path, nil,
				"holds more than %d entries (files and directories): too many for a model directory", maxTreeEntries)
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			d.Close()
			return refErr(w.ref, w.path, err, "cannot be listed at %q: %v", rel+"/", err)
		}
	}
	d.Close()
	w.entries += len(names)
	sort.Strings(names)
	for _, name := range names {
		if err := w.entry(fd, rel, name, depth); err != nil {
			return err
		}
	}
	return nil
}

func (w *treeWalk) entry(dirfd int, dirRel, name string, depth int) error {
	rel := name
	if dirRel != "" {
		rel = dirRel + "/" + name
	}
	if strings.ContainsAny(name, "\n") {
		return w.err(rel, nil, "has a newline in its name: the manifest of a model directory cannot list it")
	}
	fd, err := unix.Openat(dirfd, name, pathFlags|unix.O_NOFOLLOW, 0)
	if err != nil {
		return w.err(rel, err, "cannot be opened: %v", err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return w.err(rel, err, "cannot be examined: %v", err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		if depth+1 > maxTreeDepth {
			return w.err(rel, nil, "is more than %d directories deep: too deep for a model directory", maxTreeDepth)
		}
		for _, u := range w.users {
			if !u.canList(st.Mode, st.Uid, st.Gid) {
				return w.err(rel, errUnreachable, "is a directory %s cannot list", u.describe())
			}
		}
		return w.walk(fd, rel, depth+1)
	case unix.S_IFREG:
		for _, u := range w.users {
			if !u.canRead(st.Mode, st.Uid, st.Gid) {
				return w.err(rel, errUnreachable, "is not readable by %s", u.describe())
			}
		}
		return w.visit(rel, fd, &st)
	case unix.S_IFLNK:
		return w.err(rel, unix.ELOOP,
			"is a symbolic link: a model directory may hold only regular files and directories (copy in what it points to)")
	}
	return w.err(rel, nil, "is not a regular file or a directory (it is %s)", kind(st.Mode))
}

// walkTree walks the directory model whose top the O_PATH descriptor top
// names.
func walkTree(ref, path string, top int, users []User, visit func(rel string, fd int, st *unix.Stat_t) error) error {
	w := &treeWalk{ref: ref, path: path, users: users, visit: visit}
	return w.walk(top, "", 0)
}

// resolveTree completes Resolve for a directory (which the readers reach
// and may list): they must be able to list every directory in it, and
// read every file.
func (s *Stager) resolveTree(src Source, top int, readers []User) (Source, error) {
	if filepath.Clean(src.Path) == "/" {
		return Source{}, refErr(src.Ref, src.Path, nil, "is the root directory, not a model directory")
	}
	src.Files = []TreeFile{}
	src.Size = 0
	err := walkTree(src.Ref, src.Path, top, readers, func(rel string, _ int, st *unix.Stat_t) error {
		src.Files = append(src.Files, treeFile(rel, st))
		src.Size += st.Size
		return nil
	})
	if err != nil {
		return Source{}, err
	}
	if len(src.Files) == 0 {
		return Source{}, refErr(src.Ref, src.Path, nil, "is a directory that holds no files")
	}
	sort.Slice(src.Files, func(i, j int) bool { return src.Files[i].Rel < src.Files[j].Rel })
	return src, nil
}

// openTop opens the top of a resolved directory model again, through the
// same rules as Resolve, and refuses it if it is another directory now.
func (s *Stager) openTop(src Source) (int, error) {
	ref := src.Ref
	if ref == "" {
		ref = src.Path
	}
	fd, cur, err := s.openPath(ref)
	if err != nil {
		return -1, err
	}
	if !cur.dir || cur.Dev != src.Dev || cur.Ino != src.Ino {
		unix.Close(fd)
		return -1, refErr(src.Ref, src.Path, errChanged, "is another directory than the one resolved")
	}
	return fd, nil
}

// walkSource walks a resolved directory model again, giving visit the
// index in src.Files of each file, checked to be the version resolved;
// a file added or gone since is a change. The ctime of an inode in linked
// may have moved on: this staging linked it already, under another name.
func (s *Stager) walkSource(src Source, users []User, linked map[fileID]bool, visit func(i int, fd int) error) error {
	top, err := s.openTop(src)
	if err != nil {
		return err
	}
	defer unix.Close(top)
	index := make(map[string]int, len(src.Files))
	for i, f := range src.Files {
		index[f.Rel] = i
	}
	seen := 0
	err = walkTree(src.Ref, src.Path, top, users, func(rel string, fd int, st *unix.Stat_t) error {
		i, ok := index[rel]
		if !ok {
			return refErr(src.Ref, src.Path, errChanged, "changed since it was resolved: %q is new", rel)
		}
		if k, want := statKey(st), src.file(src.Files[i]).key(); k != want && !(linked[k.fileID] && sameContent(k, want)) {
			return refErr(src.Ref, src.Path, errChanged, "changed since it was resolved: %q is another version", rel)
		}
		seen++
		return visit(i, fd)
	})
	if err != nil {
		return err
	}
	if seen != len(src.Files) {
		return refErr(src.Ref, src.Path, errChanged, "changed since it was resolved: a file is gone")
	}
	return nil
}

// openRead opens the file an O_PATH descriptor names for reading, through
// /proc/self/fd, and makes sure it is that inode.
func (s *Stager) openRead(src Source, pfd int) (*os.File, error) {
	fd, err := s.openFile(unix.AT_FDCWD, fdPath(pfd), readFlags, 0)
	if err != nil {
		return nil, openErr(src.Ref, src.Path, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || uint64(st.Dev) != src.Dev || st.Ino != src.Ino {
		unix.Close(fd)
		return nil, refErr(src.Ref, src.Path, err, "the file opened for reading is not the one checked")
	}
	return os.NewFile(uintptr(fd), src.Path), nil
}

// treeDigest returns a directory model's digest, its manifest and the
// digest of each of its files. Files of a version already hashed are
// answered from the cache; the others are hashed, several at once (at
// most GOMAXPROCS), each one once however many callers want it. Hashing
// reports the progress over the directory's total size.
func (s *Stager) treeDigest(src Source) (string, []byte, []string, error) {
	digests := make([]string, len(src.Files))
	progress := &flight{ref: src.Ref, size: src.Size}
	type job struct {
		i      int
		f      *flight
		waited bool // another caller's hash
	}
	var own, wait []job
	s.mu.Lock()
	s.loadLocked()
	for i, tf := range src.Files {
		k := src.file(tf).key()
		switch d, ok := s.lookupLocked(k); {
		case tf.Size == 0:
			digests[i] = emptyDigest
		case ok:
			digests[i] = d
			progress.read.Add(tf.Size)
		case s.flights[k] != nil:
			wait = append(wait, job{i, s.flights[k], true})
		default:
			f := &flight{done: make(chan struct{}), size: tf.Size}
			s.flights[k] = f
			own = append(own, job{i, f, false})
		}
	}
	busy := len(own)+len(wait) > 0
	if busy {
		s.trees[progress] = true
	}
	s.mu.Unlock()
	if busy {
		defer func() {
			s.mu.Lock()
			delete(s.trees, progress)
			s.mu.Unlock()
		}()
	}

	if len(own) > 0 {
		mine := make(map[int]*flight, len(own))
		for _, j := range own {
			mine[j.i] = j.f
		}
		werr := s.hashTreeFiles(src, mine, &progress.read)
		s.mu.Lock()
		for _, j := range own {
			if j.f.digest == "" && j.f.err == nil {
				j.f.err = werr
				if j.f.err == nil {
					j.f.err = refErr(src.Ref, src.Path, errChanged, "changed while it was being read")
				}
			}
			fs := src.file(src.Files[j.i])
			delete(s.flights, fs.key())
			if j.f.err == nil {
				s.storeLocked(fs.key(), fs.Path, j.f.digest)
			}
		}
		s.mu.Unlock()
		for _, j := range own {
			close(j.f.done)
		}
		s.persist()
	}
	var errs []error
	for _, j := range append(own, wait...) {
		<-j.f.done
		if j.f.err != nil {
			errs = append(errs, j.f.err)
			continue
		}
		digests[j.i] = j.f.digest
		if j.waited {
			progress.read.Add(src.Files[j.i].Size)
		}
	}
	if len(errs) > 0 {
		return "", nil, nil, errs[0]
	}
	man := Manifest(src.Files, digests)
	return manifestDigest(man), man, digests, nil
}

// hashTreeFiles hashes the files of src whose flights mine holds, sets
// each flight's digest or error, and adds what it reads to read. It
// returns why the walk stopped, if it did.
func (s *Stager) hashTreeFiles(src Source, mine map[int]*flight, read *atomic.Int64) error {
	type job struct {
		src Source
		in  *os.File
		f   *flight
	}
	jobs := make(chan job)
	var failed atomic.Bool
	var first struct {
		sync.Once
		err error
	}
	var wg sync.WaitGroup
	for range min(runtime.GOMAXPROCS(0), len(mine)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, bufSize)
			for j := range jobs {
				j.f.digest, j.f.err = s.hashOpen(j.src, j.in, buf, &j.f.read, read)
				j.in.Close()
				if err := j.f.err; err != nil {
					first.Do(func() { first.err = err })
					failed.Store(true)
				}
			}
		}()
	}
	err := s.walkSource(src, nil, nil, func(i, fd int) error {
		if failed.Load() {
			return errStop
		}
		f, ok := mine[i]
		if !ok {
			return nil
		}
		fs := src.file(src.Files[i])
		in, err := s.openRead(fs, fd)
		if err != nil {
			f.err = err
			return err
		}
		jobs <- job{fs, in, f}
		return nil
	})
	close(jobs)
	wg.Wait()
	if errors.Is(err, errStop) {
		return first.err // a file's own error says why
	}
	return err
}

// stageTree stages a resolved directory model as stageDir/sha256-<hex>/<its
// base name>, a tree of hard links of its files (or verified copies, file
// by file where a link is not possible), made beside that name and renamed
// into place complete, with its manifest at stageDir/sha256-<hex>.manifest.
func (s *Stager) stageTree(src Source, want string, u User) (Staged, error) {
	digest, man, digests, err := s.treeDigest(src)
	if err != nil {
		return Staged{}, err
	}
	if want != "" && digest != want {
		return Staged{}, refErr(src.Ref, src.Path, ErrDigestMismatch,
			"digest mismatch: want %s, the directory has %s", want, digest)
	}
	dirName := stagePrefix + strings.TrimPrefix(digest, "sha256:")
	unlock := s.lockDir(dirName)
	defer unlock()
	dir := filepath.Join(s.stageDir, dirName)
	if err := s.ensureStageDir(); err != nil {
		return Staged{}, fmt.Errorf("stage model %q: %w", src.Ref, err)
	}
	if err := mkdir0755(dir); err != nil {
		return Staged{}, fmt.Errorf("stage model %q: %w", src.Ref, err)
	}
	staged := Staged{Source: src, Digest: digest, Path: filepath.Join(dir, filepath.Base(filepath.Clean(src.Path)))}
	manPath := filepath.Join(s.stageDir, dirName+manifestSuffix)
	if s.isStagedTree(staged.Path, manPath, man, src, digests) {
		return staged, nil
	}
	if err := s.createTree(src, digests, man, manPath, staged.Path, u); err != nil {
		return Staged{}, err
	}
	return staged, nil
}

// isStagedTree reports whether final is a staged tree of exactly src's
// files, each the source itself or a copy of it that this Stager hashed
// (or wrote) with its digest, and the manifest is in place.
func (s *Stager) isStagedTree(final, manPath string, man []byte, src Source, digests []string) bool {
	var st unix.Stat_t
	if unix.Lstat(manPath, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		return false
	}
	if data, err := os.ReadFile(manPath); err != nil || string(data) != string(man) {
		return false
	}
	top, err := unix.Open(final, pathFlags|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return false
	}
	defer unix.Close(top)
	index := make(map[string]int, len(src.Files))
	for i, f := range src.Files {
		index[f.Rel] = i
	}
	seen := 0
	err = walkTree(final, final, top, nil, func(rel string, _ int, st *unix.Stat_t) error {
		i, ok := index[rel]
		if !ok {
			return errStop
		}
		fs := src.file(src.Files[i])
		linked := uint64(st.Dev) == fs.Dev && st.Ino == fs.Ino
		copied := st.Uid == fs.UID && st.Gid == fs.GID && st.Mode&0o7777 == fs.Mode&0o444
		if !linked && !copied {
			return errStop
		}
		if fs.Size == 0 {
			if st.Size != 0 {
				return errStop
			}
		} else {
			s.mu.Lock()
			d, ok := s.lookupLocked(statKey(st))
			s.mu.Unlock()
			if !ok || d != digests[i] {
				return errStop
			}
		}
		seen++
		return nil
	})
	return err == nil && seen == len(src.Files)
}

// createTree builds the staged tree under a temporary name beside final
// and renames it into place, over whatever final was.
func (s *Stager) createTree(src Source, digests []string, man []byte, manPath, final string, u User) error {
	tmp, err := tmpName(final)
	if err != nil {
		return fmt.Errorf("stage model %q: %w", src.Ref, err)
	}
	if err := os.Mkdir(tmp, 0o755); err != nil {
		return fmt.Errorf("stage model %q: %w", src.Ref, err)
	}
	parent := filepath.Dir(final)
	if err := os.Chmod(tmp, 0o755); err != nil { // whatever the umask
		s.removeStaged(parent, filepath.Base(tmp))
		return fmt.Errorf("stage model %q: %w", src.Ref, err)
	}
	committed := false
	defer func() {
		if !committed {
			s.removeStaged(parent, filepath.Base(tmp))
		}
	}()
	made := make([]fileKey, len(src.Files))
	linkedIDs := map[fileID]bool{}
	err = s.walkSource(src, []User{u}, linkedIDs, func(i, pfd int) error {
		fs := src.file(src.Files[i])
		dst := filepath.Join(tmp, src.Files[i].Rel)
		if err := mkdirs0755(tmp, filepath.Dir(dst)); err != nil {
			return fmt.Errorf("stage model %q: %w", src.Ref, err)
		}
		linked, err := s.linkFrom(fs, pfd, dst)
		if err != nil {
			return err
		}
		if linked {
			made[i] = fs.key()
			linkedIDs[made[i].fileID] = true
			return nil
		}
		in, err := s.openRead(fs, pfd)
		if err != nil {
			return err
		}
		defer in.Close()
		made[i], err = s.copyFrom(fs, in, digests[i], dst)
		return err
	})
	if err != nil {
		return err
	}
	if err := syncTree(tmp); err != nil {
		return fmt.Errorf("stage model %q: %w", src.Ref, err)
	}
	if err := writeFileAtomic(manPath, man, 0o644); err != nil {
		return fmt.Errorf("stage model %q: manifest: %w", src.Ref, err)
	}
	if err := s.renameInto(tmp, final); err != nil {
		return fmt.Errorf("stage model %q: %w", src.Ref, err)
	}
	committed = true
	if err := syncDir(parent); err != nil {
		return fmt.Errorf("stage model %q: %w", src.Ref, err)
	}
	// As for a file: record the versions now there, linking changed their
	// ctimes.
	keys := make([]fileKey, len(src.Files))
	for i, f := range src.Files {
		var st unix.Stat_t
		if err := unix.Lstat(filepath.Join(final, f.Rel), &st); err != nil {
			return fmt.Errorf("stage model %q: %w", src.Ref, err)
		}
		if !sameContent(statKey(&st), made[i]) {
			return refErr(src.Ref, src.Path, errChanged, "changed while it was being staged; try again")
		}
		keys[i] = statKey(&st)
	}
	s.mu.Lock()
	for i, f := range src.Files {
		if f.Size > 0 {
			s.storeLocked(keys[i], filepath.Join(final, f.Rel), digests[i])
		}
	}
	s.mu.Unlock()
	s.persist()
	return nil
}

// renameInto renames the complete tree tmp to final. Whatever final was
// (an incomplete or stale tree) is swapped out atomically and removed.
func (s *Stager) renameInto(tmp, final string) error {
	err := unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, final, unix.RENAME_NOREPLACE)
	if err == nil || !errors.Is(err, unix.EEXIST) && !errors.Is(err, unix.ENOTEMPTY) &&
		!errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOSYS) {
		return err
	}
	if err = unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, final, unix.RENAME_EXCHANGE); err == nil {
		s.removeStaged(filepath.Dir(final), filepath.Base(tmp))
		return nil
	}
	// A filesystem without renameat2's flags: out with the old, then in.
	if err := s.removeStaged(filepath.Dir(final), filepath.Base(final)); err != nil {
		return err
	}
	return os.Rename(tmp, final)
}

// removeStaged removes name (a staged tree, a file or a symlink) from the
// staging directory parent, through descriptors, following no symlink.
func (s *Stager) removeStaged(parent, name string) error {
	fd, err := unix.Open(parent, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	changed, err := s.removeEntry(fd, name, 0)
	if changed {
		s.persist()
	}
	return err
}

// removeEntry removes name beneath dirfd: a directory with all it holds,
// anything else by unlinkStaged. It never follows a symlink: a directory is
// opened O_NOFOLLOW relative to its parent's descriptor.
func (s *Stager) removeEntry(dirfd int, name string, depth int) (changed bool, err error) {
	var st unix.Stat_t
	if err := unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return false, nil
		}
		return false, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return s.unlinkStaged(dirfd, name)
	}
	if depth > maxTreeDepth {
		return false, fmt.Errorf("%s: more than %d directories deep, left in place", name, maxTreeDepth)
	}
	fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return false, err
	}
	d := os.NewFile(uintptr(fd), name)
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		return false, err
	}
	var errs []error
	for _, n := range names {
		c, err := s.removeEntry(fd, n, depth+1)
		changed = changed || c
		if err != nil {
			errs = append(errs, fmt.Errorf("%s/%w", name, err))
		}
	}
	if len(errs) > 0 {
		return changed, errors.Join(errs...)
	}
	if err := unix.Unlinkat(dirfd, name, unix.AT_REMOVEDIR); err != nil && !errors.Is(err, unix.ENOENT) {
		return changed, err
	}
	return changed, nil
}

// mkdirs0755 makes dir and its parents up to root (which exists), 0755
// whatever the umask.
func mkdirs0755(root, dir string) error {
	if dir == root {
		return nil
	}
	if _, err := os.Lstat(dir); err == nil {
		return nil
	}
	if err := mkdirs0755(root, filepath.Dir(dir)); err != nil {
		return err
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		return err
	}
	return os.Chmod(dir, 0o755)
}

// syncTree makes the directories of a tree durable before it is renamed
// into place (each file copied was synced as it was made).
func syncTree(root string) error {
	return filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return err
		}
		return syncDir(p)
	})
}
