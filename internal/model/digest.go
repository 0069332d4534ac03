package model

import (
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"sort"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

const (
	cacheFileName = "digests.json"
	// Version 1 entries had no ctime: they are read, never match, and are
	// replaced as their files are hashed again.
	cacheVersion = 2
	// Enough for every model a host plausibly has seen; bounds digests.json.
	maxCacheEntries = 4096
	bufSize         = 1 << 20
)

type fileID struct{ Dev, Ino uint64 }

// fileKey is a file version: the content is assumed unchanged while all of
// it is. mtime can be set back by the file's owner; ctime cannot.
type fileKey struct {
	fileID
	Size    int64
	MtimeNs int64
	CtimeNs int64
}

func statKey(st *unix.Stat_t) fileKey {
	return fileKey{fileID{uint64(st.Dev), st.Ino}, st.Size, st.Mtim.Nano(), st.Ctim.Nano()}
}

// sameContent reports whether two versions differ at most in ctime, which a
// link, an unlink or a rename of the file changes.
func sameContent(a, b fileKey) bool {
	a.CtimeNs, b.CtimeNs = 0, 0
	return a == b
}

type cacheEntry struct {
	Dev     uint64 `json:"dev"`
	Ino     uint64 `json:"ino"`
	Size    int64  `json:"size"`
	MtimeNs int64  `json:"mtime_ns"`
	CtimeNs int64  `json:"ctime_ns"`
	Digest  string `json:"digest"`
	Path    string `json:"path,omitempty"` // for people reading the file
	used    uint64
}

func (e cacheEntry) key() fileKey {
	return fileKey{fileID{e.Dev, e.Ino}, e.Size, e.MtimeNs, e.CtimeNs}
}

type cacheFile struct {
	Version int          `json:"version"`
	Entries []cacheEntry `json:"entries"`
}

type flight struct {
	done   chan struct{}
	digest string
	err    error
	// ref and size name what is hashed; read counts the bytes hashed so
	// far (Hashing reports them).
	ref  string
	size int64
	read atomic.Int64
}

// Hashing reports how far the hash of ref has come, while one runs.
func (s *Stager) Hashing(ref string) (read, size int64, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for f := range s.trees {
		if f.ref == ref {
			return f.read.Load(), f.size, true
		}
	}
	for _, f := range s.flights {
		if f.ref == ref {
			return f.read.Load(), f.size, true
		}
	}
	return 0, 0, false
}

// counting counts what passes through it into each of ns.
type counting struct {
	r  io.Reader
	ns []*atomic.Int64
}

func (c counting) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	for _, cn := range c.ns {
		cn.Add(int64(n))
	}
	return n, err
}

// Digest returns "sha256:<hex>" of the source's content. A file version
// (device, inode, size, mtime, ctime) already hashed is answered from the cache
// without opening the file; otherwise the file is re-opened through the same
// validation as Resolve, checked to be the same version, and hashed
// streaming. Concurrent calls for one file version share one hash.
func (s *Stager) Digest(src Source) (string, error) {
	if src.dir {
		d, _, _, err := s.treeDigest(src)
		return d, err
	}
	k := src.key()
	s.mu.Lock()
	s.loadLocked()
	if d, ok := s.lookupLocked(k); ok {
		s.mu.Unlock()
		return d, nil
	}
	if f, ok := s.flights[k]; ok {
		s.mu.Unlock()
		<-f.done
		return f.digest, f.err
	}
	f := &flight{done: make(chan struct{}), ref: src.Ref, size: src.Size}
	s.flights[k] = f
	s.mu.Unlock()

	f.digest, f.err = s.hash(src, &f.read)

	s.mu.Lock()
	delete(s.flights, k)
	if f.err == nil {
		s.storeLocked(k, src.Path, f.digest)
	}
	s.mu.Unlock()
	close(f.done)
	if f.err == nil {
		s.persist()
	}
	return f.digest, f.err
}

func (s *Stager) hash(src Source, read *atomic.Int64) (string, error) {
	f, err := s.reopen(src)
	if err != nil {
		return "", err
	}
	defer f.Close()
	return s.hashOpen(src, f, make([]byte, bufSize), read)
}

// hashOpen hashes f, opened for reading from src, counting what it reads
// into each of reads.
func (s *Stager) hashOpen(src Source, f *os.File, buf []byte, reads ...*atomic.Int64) (string, error) {
	h := s.newHash()
	n, err := io.CopyBuffer(h, counting{readerOnly{f}, reads}, buf)
	if err != nil {
		return "", refErr(src.Ref, src.Path, err, "cannot be read: %v", err)
	}
	if err := unchanged(f, src, n); err != nil {
		return "", err
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), nil
}

// unchanged checks that reading f, which gave n bytes, saw the version src
// describes: a file written during the read would give a digest of nothing.
func unchanged(f *os.File, src Source, n int64) error {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return refErr(src.Ref, src.Path, err, "cannot be examined: %v", err)
	}
	if n != src.Size || statKey(&st) != src.key() {
		return refErr(src.Ref, src.Path, errChanged, "changed while it was being read; try again once it is complete")
	}
	return nil
}

// readerOnly hides (*os.File).WriteTo, so io.CopyBuffer uses our buffer.
type readerOnly struct{ io.Reader }

func (s *Stager) lookupLocked(k fileKey) (string, bool) {
	e, ok := s.cache[k.fileID]
	if !ok || e.key() != k {
		return "", false
	}
	s.used++
	e.used = s.used
	s.cache[k.fileID] = e
	return e.Digest, true
}

// storeLocked records a digest. An inode has one entry: a new version of it
// replaces the old.
func (s *Stager) storeLocked(k fileKey, path, digest string) {
	s.used++
	s.cache[k.fileID] = cacheEntry{
		Dev: k.Dev, Ino: k.Ino, Size: k.Size, MtimeNs: k.MtimeNs, CtimeNs: k.CtimeNs,
		Digest: digest, Path: path, used: s.used,
	}
	if len(s.cache) <= maxCacheEntries {
		return
	}
	var oldest fileID
	first := true
	for id, e := range s.cache {
		if first || e.used < s.cache[oldest].used {
			oldest, first = id, false
		}
	}
	delete(s.cache, oldest)
}

// loadLocked reads digests.json once. A missing, unreadable or corrupt file
// only costs re-hashing, so it is ignored (and rewritten on the next store).
func (s *Stager) loadLocked() {
	if s.loaded {
		return
	}
	s.loaded = true
	data, err := os.ReadFile(filepath.Join(s.stageDir, cacheFileName))
	if err != nil {
		return
	}
	var cf cacheFile
	if json.Unmarshal(data, &cf) != nil || cf.Version < 1 || cf.Version > cacheVersion {
		return
	}
	for _, e := range cf.Entries {
		if !ValidDigest(e.Digest) || e.Size <= 0 || e.CtimeNs == 0 {
			continue
		}
		s.used++
		e.used = s.used
		s.cache[fileID{e.Dev, e.Ino}] = e
	}
}

// persist writes the cache atomically. It is best effort: failing to write
// it only costs a re-hash after a restart, never a wrong answer.
func (s *Stager) persist() {
	s.persistMu.Lock()
	defer s.persistMu.Unlock()
	s.mu.Lock()
	s.loadLocked() // never overwrite entries not yet read
	cf := cacheFile{Version: cacheVersion, Entries: make([]cacheEntry, 0, len(s.cache))}
	for _, e := range s.cache {
		cf.Entries = append(cf.Entries, e)
	}
	s.mu.Unlock()
	sort.Slice(cf.Entries, func(i, j int) bool { return cf.Entries[i].Path < cf.Entries[j].Path })
	data, err := json.MarshalIndent(cf, "", "  ")
	if err != nil {
		return
	}
	if s.ensureStageDir() != nil {
		return
	}
	_ = writeFileAtomic(filepath.Join(s.stageDir, cacheFileName), append(data, '\n'), 0o644)
}

func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, tmpPrefix+filepath.Base(path)+"-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(perm)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
