package model

import (
	"crypto/sha256"
	"encoding/hex"
	"hash"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"
)

// newTestStager returns a Stager over a fresh models directory and a
// staging directory that does not exist yet.
func newTestStager(t *testing.T) (s *Stager, models, stage string) {
	t.Helper()
	root := tempDir(t)
	models = filepath.Join(root, "models")
	stage = filepath.Join(root, "stage")
	require.NoError(t, os.Mkdir(models, 0o755))
	return newStager(t, models, stage), models, stage
}

// tempDir is t.TempDir, which every user may pass through (as /tmp): an
// engine reaches a model only through directories it may search.
func tempDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	require.NoError(t, os.Chmod(filepath.Dir(dir), 0o755))
	require.NoError(t, os.Chmod(dir, 0o755))
	return dir
}

// engine is the made-up engine user of the tests: no owner, no group of
// any test file, so it reads what "other" may read.
var engine = User{Name: "engine", UID: 4242, GID: 4242, Role: "the engine's user"}

var engineUser = engine

// newStager is New with the test's engine user in the engines' group.
// Staging gives the staging directory to that group: without root, a
// test cannot.
func newStager(t testing.TB, models, stage string, opts ...Option) *Stager {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: staging gives the staging directory to the engines' group (chown)")
	}
	return New(models, stage, append([]Option{WithEngineGroup(engineUser.GID)}, opts...)...)
}

// needChown skips a test that gives its files to other users, as the
// operator's model files are: chown needs root.
func needChown(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: gives its files to other users (chown)")
	}
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
	require.NoError(t, os.WriteFile(path, []byte(content), 0o644))
}

// replaceFile does what an operator should: write a new file, rename it
// over the old name.
func replaceFile(t *testing.T, path, content string) {
	t.Helper()
	tmp := path + ".new"
	writeFile(t, tmp, content)
	require.NoError(t, os.Rename(tmp, path))
}

func sha(content string) string {
	sum := sha256.Sum256([]byte(content))
	return "sha256:" + hex.EncodeToString(sum[:])
}

// countHashes makes s count the hashes it starts.
func countHashes(s *Stager) *atomic.Int32 {
	var n atomic.Int32
	s.newHash = func() hash.Hash {
		n.Add(1)
		return sha256.New()
	}
	return &n
}

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	st, err := os.Stat(path)
	require.NoError(t, err)
	return st.Sys().(*syscall.Stat_t).Ino
}
