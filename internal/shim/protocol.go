package shim

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"syscall"
	"unicode/utf8"
)

// Event is the kind of a message from the shim.
type Event string

const (
	EventStarted Event = "started"
	EventFault   Event = "fault"
	EventExit    Event = "exit"
	EventError   Event = "error"
	// EventVersion: what the pool's VersionCommand printed (Line) or why
	// it failed (Error), run beside the engine as its user in its scope.
	EventVersion Event = "version"
)

// Bounds of the shim's messages. Whatever writes to the daemon's end of
// the pipe or socket can make it buffer no more than MaxMessage.
const (
	// MaxMessage bounds one message, its newline included.
	MaxMessage = 16 << 10
	// MaxLine bounds Message.Line and Message.Error, in bytes.
	MaxLine = 1 << 10
	// MaxNote bounds Spec.Note and so Message.Note.
	MaxNote = 8 << 10
	// maxPID is the kernel's PID_MAX_LIMIT.
	maxPID = 1 << 22
)

// Message is one line the shim reports to the daemon.
type Message struct {
	Event Event `json:"event"`
	PID   int   `json:"pid,omitempty"`
	// Line is the output line that showed a GPU fault.
	Line string `json:"line,omitempty"`
	// Status is the engine's wait status.
	Status uint32 `json:"status,omitempty"`
	// OOMKills is how many processes of the scope the OOM killer took
	// while the engine ran.
	OOMKills uint64 `json:"oom_kills,omitempty"`
	Error    string `json:"error,omitempty"`
	// Note is Spec.Note, with "started".
	Note json.RawMessage `json:"note,omitempty"`
}

// ReportError is a message from the shim that the daemon refuses: the
// shim (or whatever holds its pipe) is not to be believed any more.
type ReportError struct{ Why string }

func (e *ReportError) Error() string { return e.Why }

func malformed(why string) error {
	return &ReportError{Why: "malformed report from the shim: " + why}
}

// ErrTooLong is a message over MaxMessage bytes.
var ErrTooLong error = &ReportError{Why: fmt.Sprintf("report from the shim over %d bytes", MaxMessage)}

// Validate checks a message's kind and that its fields are in range and
// belong to it. Texts are never echoed into the error: they are not ours.
func (m *Message) Validate() error {
	if len(m.Line) > MaxLine || !utf8.ValidString(m.Line) {
		return malformed("line too long or not UTF-8")
	}
	if len(m.Error) > MaxLine || !utf8.ValidString(m.Error) {
		return malformed("error too long or not UTF-8")
	}
	if len(m.Note) > MaxNote {
		return malformed("note too long")
	}
	only := func(pid, line, status, ooms, errText, note bool) error {
		if (!pid && m.PID != 0) || (!line && m.Line != "") || (!status && m.Status != 0) ||
			(!ooms && m.OOMKills != 0) || (!errText && m.Error != "") || (!note && len(m.Note) != 0) {
			return malformed(fmt.Sprintf("field that %q does not have", m.Event))
		}
		return nil
	}
	switch m.Event {
	case EventStarted:
		if m.PID <= 1 || m.PID > maxPID {
			return malformed("pid out of range")
		}
		return only(true, false, false, false, false, true)
	case EventFault:
		if m.Line == "" {
			return malformed("fault without its line")
		}
		return only(false, true, false, false, false, false)
	case EventExit:
		if !exitStatus(syscall.WaitStatus(m.Status)) {
			return malformed("not the wait status of an ended process")
		}
		return only(false, false, true, true, false, false)
	case EventError:
		if m.Error == "" {
			return malformed("error without its text")
		}
		return only(false, false, false, false, true, false)
	case EventVersion:
		if (m.Line == "") == (m.Error == "") {
			return malformed("version with neither or both of its output and error")
		}
		return only(false, true, false, false, true, false)
	}
	return malformed("unknown event")
}

// exitStatus holds for the wait status of a process that exited or was
// killed, not one stopped or continued, and nothing above its 16 bits.
func exitStatus(ws syscall.WaitStatus) bool {
	if ws>>16 != 0 {
		return false
	}
	if ws.Exited() {
		return ws&0x80 == 0
	}
	return ws.Signaled()
}

// Reader reads the shim's messages, one a line. It never buffers more
// than MaxMessage, whatever it is sent.
type Reader struct{ rd *bufio.Reader }

// readChunk is the Reader's standing buffer. A daemon keeps a Reader per
// running engine, blocked in a read for the engine's whole life, and
// most messages are short: a longer one (a started with its note, a
// fault line) is put together in a buffer of its own, dropped once read.
const readChunk = 512

// NewReader reads messages from r.
func NewReader(r io.Reader) *Reader { return &Reader{bufio.NewReaderSize(r, readChunk)} }

// Next returns the next valid message. Its error is io.EOF where the
// stream ended between messages, a *ReportError where it carried
// something else, or the read error.
func (r *Reader) Next() (Message, error) {
	line, err := r.rd.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) {
		long := append(make([]byte, 0, 2*len(line)), line...)
		for errors.Is(err, bufio.ErrBufferFull) && len(long) < MaxMessage {
			line, err = r.rd.ReadSlice('\n')
			long = append(long, line...)
		}
		// As a MaxMessage buffer would: no newline in its first
		// MaxMessage bytes is too long.
		if line = long; len(line) > MaxMessage {
			err = bufio.ErrBufferFull
		}
	}
	switch {
	case errors.Is(err, bufio.ErrBufferFull):
		return Message{}, ErrTooLong
	case err == io.EOF && len(line) > 0:
		return Message{}, malformed("cut off before its end")
	case err != nil:
		return Message{}, err
	}
	return Parse(line)
}

// Parse decodes and validates one message (its newline optional).
func Parse(line []byte) (Message, error) {
	var m Message
	if len(line) > MaxMessage {
		return m, ErrTooLong
	}
	line = bytes.TrimSuffix(line, []byte("\n"))
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return Message{}, malformed("not a JSON message of the shim")
	}
	if dec.InputOffset() != int64(len(bytes.TrimRight(line, " \t\r"))) {
		return Message{}, malformed("data after the message")
	}
	if err := m.Validate(); err != nil {
		return Message{}, err
	}
	return m, nil
}

// Encode is the message's line, newline included; texts too long to fit
// MaxMessage (MaxLine bytes may grow sixfold in JSON) are cut until it
// does, at a UTF-8 boundary.
func (m Message) Encode() []byte {
	m.Line, m.Error = Cut(m.Line, MaxLine), Cut(m.Error, MaxLine)
	for {
		var b bytes.Buffer
		enc := json.NewEncoder(&b)
		enc.SetEscapeHTML(false)
		enc.Encode(m)
		if b.Len() <= MaxMessage || (m.Line == "" && m.Error == "") {
			return b.Bytes()
		}
		m.Line, m.Error = Cut(m.Line, len(m.Line)/2), Cut(m.Error, len(m.Error)/2)
	}
}

// Cut returns at most n bytes of s, not splitting a UTF-8 sequence, with
// invalid bytes replaced.
func Cut(s string, n int) string {
	s = string(bytes.ToValidUTF8([]byte(s), []byte("\uFFFD")))
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}
