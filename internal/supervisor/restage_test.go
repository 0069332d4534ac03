package supervisor_test

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
)

func sha(content string) string {
	sum := sha256.Sum256([]byte(content))
	return "sha256:" + hex.EncodeToString(sum[:])
}

// rewriteInPlace changes a file's content, keeping its inode, size and
// mtime: only its ctime tells.
func rewriteInPlace(t *testing.T, path, content string) {
	t.Helper()
	st, err := os.Stat(path)
	require.NoError(t, err)
	require.Len(t, content, int(st.Size()))
	require.NoError(t, os.WriteFile(path, []byte(content), 0o644))
	require.NoError(t, os.Chtimes(path, st.ModTime(), st.ModTime()))
}

// The engine's staged file is a hard link of the source: rewritten in
// place, the source changes it too. The next start stages the model again
// and says so by its digest.
func TestSourceRewrittenWhileRunningIsStagedAgainBeforeTheRestart(t *testing.T) {
	e := testpool.New(t, nil)
	v1, v2 := "GGUF\x03\x00\x00\x00 version 1", "GGUF\x03\x00\x00\x00 version 2"
	path := e.WriteModel("m.gguf", v1)
	s := e.Start(testpool.Spec{ID: "restage", Devices: "0", Model: path})
	first := waitFor(t, s, "ready", ready(1))
	require.Equal(t, sha(v1), first.ModelDigest)

	rewriteInPlace(t, path, v2)
	require.NoError(t, s.Fault("exit:1"))
	second := waitFor(t, s, "ready again", ready(2))
	assert.Equal(t, sha(v2), second.ModelDigest)
	assert.NotEqual(t, first.StagedPath, second.StagedPath)
	data, err := os.ReadFile(second.StagedPath)
	require.NoError(t, err)
	assert.Equal(t, v2, string(data))
}

// With ModelDigest= pinned, the changed file fails the start, with the
// reason in LastError, instead of an engine loading other content.
func TestSourceRewrittenUnderAPinnedDigestFailsTheStart(t *testing.T) {
	e := testpool.New(t, nil)
	v1, v2 := "GGUF\x03\x00\x00\x00 version 1", "GGUF\x03\x00\x00\x00 version 2"
	path := e.WriteModel("pinned.gguf", v1)
	digest := sha(v1)
	s := e.Start(testpool.Spec{ID: "pinned", Devices: "0", Model: path, Extra: "[Pool]\nModelDigest=" + digest + "\n"})
	waitFor(t, s, "ready", ready(1))

	rewriteInPlace(t, path, v2)
	require.NoError(t, s.Stop(e.Ctx))
	err := s.Start()
	require.Error(t, err)
	assert.Contains(t, err.Error(), "digest mismatch: want "+digest+", the file has "+sha(v2))
	snap := s.Snapshot()
	assert.Equal(t, lifecycle.Failed, snap.State)
	assert.Contains(t, snap.LastError, "digest mismatch")
	assert.Equal(t, 1, snap.Starts, "no engine started on other content")
}
