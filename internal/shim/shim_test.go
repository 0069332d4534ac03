package shim

import (
	"bytes"
	"errors"
	"os"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/llorch/pool-managerd/internal/crash"
)

type lines struct{ got [][]byte }

func (l *lines) Write(p []byte) (int, error) {
	l.got = append(l.got, bytes.Clone(p))
	return len(p), nil
}

// A line of any length reaches the journal in pieces no longer than
// journald's LineMax, cut between UTF-8 sequences, and the fault scan sees
// the start of every line after it.
func TestLongLinesFlowInPiecesAndTheScanGoesOn(t *testing.T) {
	long := strings.Repeat("€", (4<<20)/3) // 3-byte runes: pieces of 48 KiB would split them
	in := "first\n" + long + "\nCUDA error: an illegal memory access was encountered\n  current device: 0, in function f at ggml-cuda.cu:1\nlast without newline"
	var out lines
	var starts []string
	var scan crash.FaultScanner
	fault := ""
	forwardLines(strings.NewReader(in), &out, func(l []byte) {
		starts = append(starts, string(l))
		if f, ok := scan.Line(l); ok {
			fault = f
		}
	})

	for _, p := range out.got {
		require.True(t, bytes.HasSuffix(p, []byte("\n")), "every piece is a journal line")
		require.LessOrEqual(t, len(p)-1, pieceMax)
		require.True(t, utf8.Valid(p), "no UTF-8 sequence is split")
	}
	n := len(out.got)
	require.Greater(t, n, 4+len(long)/pieceMax)
	assert.Equal(t, "first\n", string(out.got[0]))
	var joined []byte
	for _, p := range out.got[1 : n-3] {
		joined = append(joined, bytes.TrimSuffix(p, []byte("\n"))...)
	}
	assert.True(t, string(joined) == long, "the long line's pieces add up to it")
	assert.Equal(t, "last without newline\n", string(out.got[n-1]))
	require.Len(t, starts, 5, "the long line's continuations are not line starts")
	assert.Equal(t, "first", starts[0])
	assert.Equal(t, "last without newline", starts[4])
	assert.Equal(t, "CUDA error: an illegal memory access was encountered", fault)
}

// Bytes that are not text, and a line cut mid-sequence, flow as they are.
func TestAnyBytesFlow(t *testing.T) {
	in := append(bytes.Repeat([]byte{0xff, 0x00, 0xe2}, pieceMax), '\n')
	var out lines
	forwardLines(bytes.NewReader(in), &out, func([]byte) {})
	var all []byte
	for _, p := range out.got {
		all = append(all, p...)
	}
	assert.Equal(t, len(in)+len(out.got)-1, len(all), "every byte is forwarded, one newline added per cut")
}

type failing struct{}

func (failing) Write([]byte) (int, error) { return 0, errors.New("journal gone") }

// A journal that fails does not stop the reading: the engine never blocks
// on its output.
func TestOutputIsReadWhateverTheJournalDoes(t *testing.T) {
	r, w, err := os.Pipe()
	require.NoError(t, err)
	defer r.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		forwardLines(r, failing{}, func([]byte) {})
	}()
	wrote := make(chan error, 1)
	go func() {
		_, err := w.Write(bytes.Repeat([]byte("x"), 16<<20))
		w.Close()
		wrote <- err
	}()
	select {
	case err := <-wrote:
		assert.NoError(t, err)
	case <-time.After(20 * time.Second):
		t.Fatal("the engine's write blocked")
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the forwarder did not end with its stream")
	}
}

func TestCloseOnExecFrom(t *testing.T) {
	fd, err := unix.Dup(0) // dup(2) leaves close-on-exec off
	require.NoError(t, err)
	defer unix.Close(fd)
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	require.NoError(t, err)
	require.Zero(t, flags&unix.FD_CLOEXEC)
	closeOnExecFrom(3)
	flags, err = unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	require.NoError(t, err)
	assert.NotZero(t, flags&unix.FD_CLOEXEC)
	for i := range 3 {
		flags, err := unix.FcntlInt(uintptr(i), unix.F_GETFD, 0)
		require.NoError(t, err)
		assert.Zero(t, flags&unix.FD_CLOEXEC, "stdio %d stays", i)
	}
}
