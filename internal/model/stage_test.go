package model

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

func requireStaged(t *testing.T, st Staged, content string) {
	t.Helper()
	data, err := os.ReadFile(st.Path)
	require.NoError(t, err)
	assert.Equal(t, content, string(data))
	fi, err := os.Lstat(st.Path)
	require.NoError(t, err)
	assert.True(t, fi.Mode().IsRegular())
	sys := fi.Sys().(*syscall.Stat_t)
	if sys.Ino == st.Ino && sys.Dev == st.Dev {
		assert.Equal(t, st.Mode, sys.Mode&0o7777, "a hard link: the source's own mode")
	} else {
		assert.Equal(t, st.Mode&0o444, sys.Mode&0o7777, "a copy: the source's read bits only")
	}
	assert.Equal(t, [2]uint32{st.UID, st.GID}, [2]uint32{sys.Uid, sys.Gid}, "the source's owner and group")
	di, err := os.Stat(filepath.Dir(st.Path))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o755), di.Mode().Perm())
}

func TestStage(t *testing.T) {
	s, models, stage := newTestStager(t)
	path := filepath.Join(models, "llama", "8b-q4.gguf")
	writeFile(t, path, "model v1")
	hashes := countHashes(s)

	st, err := s.Stage("llama/8b-q4.gguf", "", engineUser)
	require.NoError(t, err)
	want := sha("model v1")
	assert.Equal(t, want, st.Digest)
	assert.Equal(t, filepath.Join(stage, "sha256-"+want[len("sha256:"):], "8b-q4.gguf"), st.Path)
	assert.Equal(t, path, st.Source.Path)
	requireStaged(t, st, "model v1")
	assert.Equal(t, inode(t, path), inode(t, st.Path), "same filesystem: a hard link")
	si, err := os.Stat(stage)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o710), si.Mode().Perm(), "the engines' group passes through, nobody else")
	assert.Equal(t, engineUser.GID, si.Sys().(*syscall.Stat_t).Gid)

	// Again, with the digest given: same path, nothing re-hashed.
	again, err := s.Stage("llama/8b-q4.gguf", want, engineUser)
	require.NoError(t, err)
	assert.Equal(t, st.Path, again.Path)
	assert.EqualValues(t, 1, hashes.Load())

	// The operator replaces the source: the staged file does not change.
	replaceFile(t, path, "model v2")
	requireStaged(t, st, "model v1")
	v2, err := s.Stage("llama/8b-q4.gguf", "", engineUser)
	require.NoError(t, err)
	assert.Equal(t, sha("model v2"), v2.Digest)
	assert.NotEqual(t, st.Path, v2.Path)
	requireStaged(t, v2, "model v2")
	requireStaged(t, st, "model v1")

	// Other forms of a ref to the same file stage to the same path.
	for _, ref := range []string{path, "file://" + path} {
		other, err := s.Stage(ref, "", engineUser)
		require.NoError(t, err, ref)
		assert.Equal(t, v2.Path, other.Path, ref)
	}
	assert.EqualValues(t, 2, hashes.Load())

	// Nothing half-done is left around.
	entries, err := os.ReadDir(filepath.Dir(v2.Path))
	require.NoError(t, err)
	require.Len(t, entries, 1)
}

func TestStageBadDigest(t *testing.T) {
	s, models, stage := newTestStager(t)
	writeFile(t, filepath.Join(models, "m.gguf"), "content")
	wrong := sha("something else")

	_, err := s.Stage("m.gguf", wrong, engineUser)
	var re *RefError
	require.ErrorAs(t, err, &re)
	assert.ErrorIs(t, err, ErrDigestMismatch)
	assert.Contains(t, err.Error(), "digest mismatch: want "+wrong+", the file has "+sha("content"))
	assert.NoDirExists(t, filepath.Join(stage, "sha256-"+sha("content")[len("sha256:"):]))

	for _, bad := range []string{
		"sha256:abc",
		"sha256:" + strings.Repeat("AB", 32),
		"md5:" + fmt.Sprintf("%064x", 1),
		fmt.Sprintf("%064x", 1),
		"sha256:" + fmt.Sprintf("%065x", 1),
	} {
		_, err := s.Stage("m.gguf", bad, engineUser)
		require.ErrorAs(t, err, &re, bad)
		assert.Contains(t, err.Error(), fmt.Sprintf("malformed digest %q", bad))
	}
}

func TestStageNothingCreatedOnBadRef(t *testing.T) {
	s, _, stage := newTestStager(t)
	_, err := s.Stage("missing.gguf", "", engineUser)
	var re *RefError
	require.ErrorAs(t, err, &re)
	_, err = s.Stage("missing.gguf", "sha256:nope", engineUser)
	require.ErrorAs(t, err, &re)
	assert.NoDirExists(t, stage)
}

// A staging directory on another filesystem: link fails with EXDEV and the
// file is copied, hashing the copy.
func TestStageCopyAcrossFilesystems(t *testing.T) {
	s, models, _ := newTestStager(t)
	path := filepath.Join(models, "m.gguf")
	content := string(make([]byte, 2*bufSize+5)) + "tail"
	writeFile(t, path, content)
	links := 0
	s.link = func(oldname, newname string) error {
		links++
		return &os.LinkError{Op: "link", Old: oldname, New: newname, Err: syscall.EXDEV}
	}
	hashes := countHashes(s)

	st, err := s.Stage("m.gguf", sha(content), engineUser)
	require.NoError(t, err)
	assert.Equal(t, 1, links)
	assert.EqualValues(t, 2, hashes.Load(), "the digest, then the copy")
	requireStaged(t, st, content)
	assert.NotEqual(t, inode(t, path), inode(t, st.Path), "a copy")

	// The copy is known: staging again neither copies nor hashes.
	again, err := s.Stage("m.gguf", "", engineUser)
	require.NoError(t, err)
	assert.Equal(t, st.Path, again.Path)
	assert.Equal(t, 1, links)
	assert.EqualValues(t, 2, hashes.Load())

	// Even after a restart.
	s2 := newStager(t, models, filepath.Dir(filepath.Dir(st.Path)))
	s2.link = s.link
	hashes = countHashes(s2)
	again, err = s2.Stage("m.gguf", "", engineUser)
	require.NoError(t, err)
	assert.Equal(t, st.Path, again.Path)
	assert.Equal(t, 1, links)
	assert.EqualValues(t, 0, hashes.Load())
}

// The copy is checked against the digest: here the cached digest is wrong
// (as if the cache file had been damaged), and the copy says so.
func TestStageCopyVerified(t *testing.T) {
	s, models, _ := newTestStager(t)
	path := filepath.Join(models, "m.gguf")
	writeFile(t, path, "tampered")
	src, err := s.Resolve("m.gguf", engineUser)
	require.NoError(t, err)
	d := sha("original")
	s.mu.Lock()
	s.loadLocked()
	s.storeLocked(src.key(), path, d)
	s.mu.Unlock()
	s.link = func(string, string) error { return syscall.EXDEV }

	_, err = s.Stage("m.gguf", "", engineUser)
	var re *RefError
	require.ErrorAs(t, err, &re)
	assert.ErrorIs(t, err, ErrDigestMismatch)
	assert.Contains(t, err.Error(), "the copy does not match the digest: want "+d+", copied "+sha("tampered"))
	dir := filepath.Join(filepath.Dir(filepath.Dir(path)), "stage", "sha256-"+d[len("sha256:"):])
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	assert.Empty(t, entries, "no staged file, no temporary left")
}

func TestStageLinkErrors(t *testing.T) {
	s, models, _ := newTestStager(t)
	writeFile(t, filepath.Join(models, "m.gguf"), "x")
	s.link = func(string, string) error { return syscall.EIO }
	_, err := s.Stage("m.gguf", "", engineUser)
	require.ErrorIs(t, err, syscall.EIO)
}

// A staged file that is not what was recorded is made again.
func TestStageRecreates(t *testing.T) {
	tests := []struct {
		name   string
		tamper func(t *testing.T, staged string)
	}{
		{"removed", func(t *testing.T, p string) { require.NoError(t, os.Remove(p)) }},
		{"made writable", func(t *testing.T, p string) { require.NoError(t, os.Chmod(p, 0o644)) }},
		{"replaced", func(t *testing.T, p string) {
			require.NoError(t, os.Remove(p))
			require.NoError(t, os.WriteFile(p, []byte("junk"), 0o444))
		}},
		{"replaced by a symlink", func(t *testing.T, p string) {
			require.NoError(t, os.Remove(p))
			require.NoError(t, os.Symlink("/dev/null", p))
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, models, _ := newTestStager(t)
			writeFile(t, filepath.Join(models, "m.gguf"), "content")
			s.link = func(string, string) error { return syscall.EXDEV }
			st, err := s.Stage("m.gguf", "", engineUser)
			require.NoError(t, err)
			tt.tamper(t, st.Path)

			again, err := s.Stage("m.gguf", "", engineUser)
			require.NoError(t, err)
			assert.Equal(t, st.Path, again.Path)
			requireStaged(t, again, "content")
		})
	}
}

func TestStageConcurrent(t *testing.T) {
	s, models, _ := newTestStager(t)
	writeFile(t, filepath.Join(models, "m.gguf"), "content")
	s.link = func(string, string) error { return syscall.EXDEV }
	var wg sync.WaitGroup
	paths := make([]string, 8)
	for i := range paths {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := s.Stage("m.gguf", "", engineUser)
			assert.NoError(t, err)
			paths[i] = st.Path
		}()
	}
	wg.Wait()
	for _, p := range paths {
		assert.Equal(t, paths[0], p)
	}
	entries, err := os.ReadDir(filepath.Dir(paths[0]))
	require.NoError(t, err)
	assert.Len(t, entries, 1)
}

func TestStageUmask(t *testing.T) {
	s, models, _ := newTestStager(t)
	writeFile(t, filepath.Join(models, "m.gguf"), "content")
	old := unix.Umask(0o077)
	defer unix.Umask(old)
	st, err := s.Stage("m.gguf", "", engineUser)
	require.NoError(t, err)
	requireStaged(t, st, "content")
}

func TestPrune(t *testing.T) {
	s, models, stage := newTestStager(t)
	writeFile(t, filepath.Join(models, "a.gguf"), "a")
	writeFile(t, filepath.Join(models, "b.gguf"), "b")
	writeFile(t, filepath.Join(models, "b-copy.gguf"), "b")
	a, err := s.Stage("a.gguf", "", engineUser)
	require.NoError(t, err)
	b, err := s.Stage("b.gguf", "", engineUser)
	require.NoError(t, err)
	bCopy, err := s.Stage("b-copy.gguf", "", engineUser)
	require.NoError(t, err)
	require.Equal(t, filepath.Dir(b.Path), filepath.Dir(bCopy.Path))
	stale := filepath.Join(filepath.Dir(a.Path), tmpPrefix+"0123456789abcdef")
	require.NoError(t, os.WriteFile(stale, []byte("half"), 0o600))
	staleCache := filepath.Join(stage, tmpPrefix+cacheFileName+"-123")
	require.NoError(t, os.WriteFile(staleCache, []byte("half"), 0o600))
	other := filepath.Join(stage, "operator-notes.txt")
	require.NoError(t, os.WriteFile(other, []byte("keep me"), 0o644))

	require.NoError(t, s.Prune([]string{b.Path}))
	assert.NoDirExists(t, filepath.Dir(a.Path))
	assert.FileExists(t, b.Path)
	assert.NoFileExists(t, bCopy.Path)
	assert.NoFileExists(t, staleCache)
	assert.FileExists(t, other)
	assert.FileExists(t, filepath.Join(stage, cacheFileName))
	assert.FileExists(t, filepath.Join(models, "a.gguf"), "sources are never touched")

	require.NoError(t, s.Prune(nil))
	assert.NoDirExists(t, filepath.Dir(b.Path))

	// Pruned content stages again.
	a2, err := s.Stage("a.gguf", "", engineUser)
	require.NoError(t, err)
	requireStaged(t, a2, "a")

	// Nothing to prune is not an error.
	s2, _, _ := newTestStager(t)
	require.NoError(t, s2.Prune(nil))
}

func TestPruneForgetsCopies(t *testing.T) {
	s, models, _ := newTestStager(t)
	writeFile(t, filepath.Join(models, "m.gguf"), "content")
	s.link = func(string, string) error { return syscall.EXDEV }
	st, err := s.Stage("m.gguf", "", engineUser)
	require.NoError(t, err)
	copyIno := inode(t, st.Path)
	require.NoError(t, s.Prune(nil))
	s.mu.Lock()
	for id := range s.cache {
		assert.NotEqual(t, copyIno, id.Ino)
	}
	s.mu.Unlock()
}
