package model

import (
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestDigest(t *testing.T) {
	s, models, _ := newTestStager(t)
	path := filepath.Join(models, "m.gguf")
	writeFile(t, path, "first content")
	hashes := countHashes(s)

	src, err := s.Resolve("m.gguf", engineUser)
	require.NoError(t, err)
	d, err := s.Digest(src)
	require.NoError(t, err)
	assert.Equal(t, sha("first content"), d)
	assert.True(t, ValidDigest(d))
	assert.EqualValues(t, 1, hashes.Load())

	// Same version: answered from the cache.
	d, err = s.Digest(src)
	require.NoError(t, err)
	assert.Equal(t, sha("first content"), d)
	assert.EqualValues(t, 1, hashes.Load())

	// A new mtime is a new version.
	st, err := os.Stat(path)
	require.NoError(t, err)
	later := st.ModTime().Add(time.Second)
	require.NoError(t, os.Chtimes(path, later, later))
	src, err = s.Resolve("m.gguf", engineUser)
	require.NoError(t, err)
	d, err = s.Digest(src)
	require.NoError(t, err)
	assert.Equal(t, sha("first content"), d, "recomputed, same content")
	assert.EqualValues(t, 2, hashes.Load())
}

func TestDigestLargeFile(t *testing.T) {
	s, models, _ := newTestStager(t)
	content := make([]byte, 3*bufSize+17)
	for i := range content {
		content[i] = byte(i * 7)
	}
	writeFile(t, filepath.Join(models, "big.gguf"), string(content))
	src, err := s.Resolve("big.gguf", engineUser)
	require.NoError(t, err)
	d, err := s.Digest(src)
	require.NoError(t, err)
	assert.Equal(t, sha(string(content)), d)
}

func TestDigestChangedSinceResolve(t *testing.T) {
	s, models, _ := newTestStager(t)
	path := filepath.Join(models, "m.gguf")
	writeFile(t, path, "v1")
	src, err := s.Resolve("m.gguf", engineUser)
	require.NoError(t, err)
	replaceFile(t, path, "v2")

	_, err = s.Digest(src)
	var re *RefError
	require.ErrorAs(t, err, &re)
	assert.Contains(t, err.Error(), "changed since it was resolved")
}

func TestDigestConcurrent(t *testing.T) {
	s, models, _ := newTestStager(t)
	writeFile(t, filepath.Join(models, "m.gguf"), "shared content")
	hashes := countHashes(s)
	src, err := s.Resolve("m.gguf", engineUser)
	require.NoError(t, err)

	var wg sync.WaitGroup
	start := make(chan struct{})
	digests := make([]string, 8)
	errs := make([]error, 8)
	for i := range digests {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			digests[i], errs[i] = s.Digest(src)
		}()
	}
	close(start)
	wg.Wait()
	for i := range digests {
		require.NoError(t, errs[i])
		assert.Equal(t, sha("shared content"), digests[i])
	}
	assert.EqualValues(t, 1, hashes.Load())
}

func TestDigestCachePersisted(t *testing.T) {
	s, models, stage := newTestStager(t)
	writeFile(t, filepath.Join(models, "m.gguf"), "persisted")
	src, err := s.Resolve("m.gguf", engineUser)
	require.NoError(t, err)
	_, err = s.Digest(src)
	require.NoError(t, err)
	require.FileExists(t, filepath.Join(stage, cacheFileName))

	// A new Stager (a daemon restart) does not hash the file again.
	s2 := newStager(t, models, stage)
	hashes := countHashes(s2)
	d, err := s2.Digest(src)
	require.NoError(t, err)
	assert.Equal(t, sha("persisted"), d)
	assert.EqualValues(t, 0, hashes.Load())

	// A corrupt cache is ignored, and replaced by a good one.
	for _, junk := range []string{"{not json", `{"version":99,"entries":[]}`, `{"version":1,"entries":[{"digest":"md5:x"}]}`} {
		require.NoError(t, os.WriteFile(filepath.Join(stage, cacheFileName), []byte(junk), 0o644))
		s3 := newStager(t, models, stage)
		hashes = countHashes(s3)
		d, err = s3.Digest(src)
		require.NoError(t, err, junk)
		assert.Equal(t, sha("persisted"), d, junk)
		assert.EqualValues(t, 1, hashes.Load(), junk)

		s4 := newStager(t, models, stage)
		hashes = countHashes(s4)
		_, err = s4.Digest(src)
		require.NoError(t, err)
		assert.EqualValues(t, 0, hashes.Load(), "rewritten after %q", junk)
	}
	st, err := os.Stat(filepath.Join(stage, cacheFileName))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o644), st.Mode().Perm())
}
