package pprofhook

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func serve(t *testing.T) string {
	sock := filepath.Join(t.TempDir(), "pprof.sock")
	l, err := Serve(sock)
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	return sock
}

func TestTheHookAnswersAGoroutineDumpWithItselfAsOneGoroutine(t *testing.T) {
	sock := serve(t)
	for range 3 {
		dump, err := Ask(sock, "goroutine")
		require.NoError(t, err)
		assert.Contains(t, string(dump), "TestTheHookAnswersAGoroutineDumpWithItselfAsOneGoroutine")
		assert.Equal(t, 1, strings.Count(string(dump), "created by github.com/llorch/pool-managerd/internal/tools/soak/pprofhook.Serve"), "the hook is one goroutine:\n%s", dump)
	}
}

func TestTheHookAnswersTheLiveHeap(t *testing.T) {
	a, err := Ask(serve(t), "heap")
	require.NoError(t, err)
	n, err := strconv.ParseUint(strings.TrimSpace(string(a)), 10, 64)
	require.NoError(t, err)
	assert.Positive(t, n)
}

func TestTheHookAnswersAHeapProfile(t *testing.T) {
	p, err := Ask(serve(t), "heapprofile")
	require.NoError(t, err)
	require.Greater(t, len(p), 2)
	assert.Equal(t, []byte{0x1f, 0x8b}, p[:2], "a gzipped profile")
}

func TestTheHookRefusesAnUnknownQuestionAndGoesOn(t *testing.T) {
	sock := serve(t)
	_, err := Ask(sock, "threadcreate")
	assert.ErrorContains(t, err, `"threadcreate" is not a question`)
	_, err = Ask(sock, "heap")
	assert.NoError(t, err)
}

func TestTheHookLeaksAGoroutineAndAnFDWhenAsked(t *testing.T) {
	sock := serve(t)
	before, err := Ask(sock, "goroutine")
	require.NoError(t, err)
	fdsBefore, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	for range 2 {
		_, err := Ask(sock, "leak")
		require.NoError(t, err)
	}
	after, err := Ask(sock, "goroutine")
	require.NoError(t, err)
	const planted = "created by github.com/llorch/pool-managerd/internal/tools/soak/pprofhook.answer"
	assert.Equal(t, strings.Count(string(before), planted)+2, strings.Count(string(after), planted))
	fdsAfter, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	assert.Len(t, fdsAfter, len(fdsBefore)+2, "one fd leaked per ask")
}

func TestServeRefusesAPathItCannotListenOn(t *testing.T) {
	_, err := Serve(filepath.Join(t.TempDir(), "no", "such", "dir", "pprof.sock"))
	assert.Error(t, err)
}
