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
	root := t.TempDir()
	models = filepath.Join(root, "models")
	stage = filepath.Join(root, "stage")
	require.NoError(t, os.Mkdir(models, 0o755))
	return newStager(models, stage), models, stage
}

// engine is the made-up engine user of the tests: no owner, no group of
// any test file, so it reads what "other" may read.
var engine = User{Name: "engine", UID: 4242, GID: 4242}

var engineUser = engine

// newStager is New.
func newStager(models, stage string, opts ...Option) *Stager {
	return New(models, stage, opts...)
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
