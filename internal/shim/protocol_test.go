package shim

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"syscall"
	"testing"
	"unicode/utf8"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// endless is a writer that never ends its line.
type endless struct{ read int }

func (e *endless) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = 'x'
	}
	e.read += len(p)
	return len(p), nil
}

// Whatever holds the daemon's end of the pipe, one bad line is the end of
// the shim as a witness, with a reason; the daemon never buffers more
// than MaxMessage.
func TestReaderRefusesWhatIsNotAReport(t *testing.T) {
	cases := []struct {
		name, input, why string
	}{
		{"oversized line", `{"event":"fault","line":"` + strings.Repeat("x", MaxMessage) + "\"}\n", "over 16384 bytes"},
		{"no newline before the end", `{"event":"exit","status":0}`, "cut off"},
		{"garbage", "\x00\xff garbage\n", "not a JSON message"},
		{"empty line", "\n", "not a JSON message"},
		{"unknown event", `{"event":"exited","status":0}` + "\n", "unknown event"},
		{"unknown field", `{"event":"exit","status":0,"forged":true}` + "\n", "not a JSON message"},
		{"two messages on a line", `{"event":"exit","status":0}{"event":"exit","status":0}` + "\n", "data after the message"},
		{"stopped, not ended", `{"event":"exit","status":4991}` + "\n", "wait status"},
		{"status above 16 bits", `{"event":"exit","status":65536}` + "\n", "wait status"},
		{"no pid", `{"event":"started"}` + "\n", "pid out of range"},
		{"pid beyond the kernel's", `{"event":"started","pid":4194305}` + "\n", "pid out of range"},
		{"fault without a line", `{"event":"fault"}` + "\n", "fault without its line"},
		{"fault line too long", `{"event":"fault","line":"` + strings.Repeat("x", MaxLine+1) + "\"}\n", "line too long"},
		{"a field of another event", `{"event":"fault","line":"CUDA error","status":9}` + "\n", "field that \"fault\" does not have"},
		{"error without text", `{"event":"error"}` + "\n", "error without its text"},
	}
	for _, c := range cases {
		_, err := NewReader(strings.NewReader(c.input)).Next()
		var bad *ReportError
		if assert.ErrorAs(t, err, &bad, c.name) {
			assert.Contains(t, bad.Why, c.why, c.name)
			assert.LessOrEqual(t, len(bad.Why), 200, "%s: the reason does not echo the input", c.name)
		}
	}

	src := &endless{}
	_, err := NewReader(src).Next()
	assert.ErrorIs(t, err, ErrTooLong)
	assert.LessOrEqual(t, src.read, MaxMessage, "read no more than one message's worth")

	_, err = NewReader(strings.NewReader("")).Next()
	assert.Equal(t, io.EOF, err, "an end between messages is just that")
}

// The shim's own messages always fit and pass, whatever the engine
// printed in its fault line.
func TestShimMessagesFitAndPass(t *testing.T) {
	msgs := []Message{
		{Event: EventStarted, PID: 4711, Note: []byte(`{"model":"a<b>&c.gguf","staged":"/var/lib/x"}`)},
		{Event: EventFault, Line: "CUDA error: an illegal memory access was encountered"},
		{Event: EventFault, Line: strings.Repeat("é", 100<<10)},
		{Event: EventFault, Line: strings.Repeat("\x01", 100<<10)},
		{Event: EventFault, Line: "bad \xff\xfe bytes"},
		{Event: EventExit, Status: uint32(syscall.SIGABRT) | 0x80, OOMKills: 3},
		{Event: EventExit, Status: 7 << 8},
		{Event: EventError, Error: "start /usr/bin/llama-server: " + strings.Repeat("no such file ", 1000)},
	}
	var stream bytes.Buffer
	for _, m := range msgs {
		b := m.Encode()
		require.LessOrEqual(t, len(b), MaxMessage)
		stream.Write(b)
	}
	rd := NewReader(&stream)
	for _, want := range msgs {
		got, err := rd.Next()
		require.NoError(t, err, "%.80s", want.Line)
		assert.Equal(t, want.Event, got.Event)
		assert.Equal(t, want.PID, got.PID)
		assert.Equal(t, want.Status, got.Status)
		assert.True(t, utf8.ValidString(got.Line))
		assert.True(t, strings.HasPrefix(strings.ToValidUTF8(want.Line, "\uFFFD"), got.Line), "a cut of the line: %.80q", got.Line)
		assert.LessOrEqual(t, len(got.Line), MaxLine)
		assert.LessOrEqual(t, len(got.Error), MaxLine)
	}
	_, err := rd.Next()
	assert.Equal(t, io.EOF, err)
}

func FuzzReadMessage(f *testing.F) {
	for _, m := range []Message{
		{Event: EventStarted, PID: 4711, Note: []byte(`{"model":"m.gguf"}`)},
		{Event: EventFault, Line: "CUDA error: out of memory"},
		{Event: EventExit, Status: 134, OOMKills: 1},
		{Event: EventError, Error: "no go-ahead from the daemon"},
	} {
		f.Add(m.Encode())
	}
	f.Add([]byte(`{"event":"exit","status":0}`))
	f.Add([]byte("{\"event\":\"exit\"}\n{\"event\":\"started\",\"pid\":2}\n"))
	f.Add([]byte("\xff\n\n"))
	f.Fuzz(func(t *testing.T, in []byte) {
		rd := NewReader(bytes.NewReader(in))
		for range 8 {
			m, err := rd.Next()
			if err != nil {
				var bad *ReportError
				if !errors.As(err, &bad) && err != io.EOF {
					t.Fatalf("error of an unknown kind: %v", err)
				}
				return
			}
			if err := m.Validate(); err != nil {
				t.Fatalf("accepted an invalid message: %v", err)
			}
			again, err := Parse(m.Encode())
			if err != nil {
				t.Fatalf("an accepted message does not survive its own encoding: %v", err)
			}
			if again.Event != m.Event || again.PID != m.PID || again.Line != m.Line || again.Status != m.Status || again.OOMKills != m.OOMKills || again.Error != m.Error {
				t.Fatalf("round trip changed %+v into %+v", m, again)
			}
		}
	})
}

// A message longer than the Reader's standing buffer is read whole, and
// the bound is MaxMessage exactly, the newline included, as it was with a
// buffer of MaxMessage: no newline within the first MaxMessage bytes is
// too long.
func TestReaderBoundIsMaxMessage(t *testing.T) {
	msg := `{"event":"exit","status":0}`
	// JSON allows blanks around the message.
	fit := msg + strings.Repeat(" ", MaxMessage-len(msg)-1) + "\n"
	require.Len(t, fit, MaxMessage)
	rd := NewReader(strings.NewReader(fit + msg + "\n" + " " + fit))
	for i, want := range []error{nil, nil, ErrTooLong} {
		m, err := rd.Next()
		if want != nil {
			assert.ErrorIs(t, err, want, "message %d", i)
			continue
		}
		require.NoError(t, err, "message %d", i)
		assert.Equal(t, EventExit, m.Event)
	}
	for _, n := range []int{readChunk - 1, readChunk, readChunk + 1, 3 * readChunk} {
		line := msg + strings.Repeat(" ", n) + "\n"
		rd := NewReader(strings.NewReader(line + line))
		for i := range 2 {
			m, err := rd.Next()
			require.NoError(t, err, "%d blanks, message %d", n, i)
			assert.Equal(t, EventExit, m.Event)
		}
		_, err := rd.Next()
		assert.Equal(t, io.EOF, err)
		_, err = NewReader(strings.NewReader(strings.TrimSuffix(line, "\n"))).Next()
		var bad *ReportError
		if assert.ErrorAs(t, err, &bad) {
			assert.Contains(t, bad.Why, "cut off")
		}
	}
}

// A version report carries either what the command printed or why it
// failed, never both nor neither, and nothing else.
func TestVersionReports(t *testing.T) {
	for _, m := range []Message{
		{Event: EventVersion, Line: "version: 0.7.0 (build 11669, commit Debian)"},
		{Event: EventVersion, Error: "VersionCommand /bin/false: exit status 1"},
	} {
		assert.NoError(t, m.Validate(), "%+v", m)
	}
	for _, m := range []Message{
		{Event: EventVersion},
		{Event: EventVersion, Line: "v", Error: "e"},
		{Event: EventVersion, Line: "v", PID: 4711},
		{Event: EventVersion, Line: strings.Repeat("v", MaxLine+1)},
	} {
		assert.Error(t, m.Validate(), "%+v", m)
	}
}
