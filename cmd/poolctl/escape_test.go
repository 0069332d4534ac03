package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	ifaces "github.com/llorch/pool-managerd/dbus"
)

// forged is what an engine's health answer might put in LastError: a
// status line of its own and a clear-screen.
const forged = "health: 503\n● llama-8b - ready\x1b[2J"

// escapedForged is forged as poolctl prints it.
const escapedForged = `health: 503\n● llama-8b - ready\x1b[2J`

// assertNoControl fails if out holds a control character other than the
// newlines that end its lines.
func assertNoControl(t *testing.T, out string) {
	t.Helper()
	assert.False(t, strings.ContainsFunc(out, func(r rune) bool { return r < 0x20 && r != '\n' || r == 0x7f }), "%q", out)
}

func TestStatusPrintsAForgedLastErrorAsOneEscapedLine(t *testing.T) {
	m := map[string]dbus.Variant{
		"Id": dbus.MakeVariant("llama-8b"), "State": dbus.MakeVariant("backoff"),
		"Model": dbus.MakeVariant("m.gguf\r\x1b]0;owned\x07"), "LastError": dbus.MakeVariant(forged),
	}
	var out bytes.Buffer
	c := &cli{stdout: &out}
	c.printStatus("llama-8b", m, time.Now())
	lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	require.Len(t, lines, 1+len(m)+1, "the header, a line a property and Uptime:\n%s", out.String())
	assert.Equal(t, "● llama-8b - backoff", lines[0])
	assert.Contains(t, lines, "LastError: "+escapedForged)
	assert.Contains(t, lines, `    Model: m.gguf\r\x1b]0;owned\x07`)
	assertNoControl(t, out.String())
}

func TestJournalLinesAreEscaped(t *testing.T) {
	var out bytes.Buffer
	printJournal(&out, []byte("engine: listening\nengine: "+forged+"\rok\n"), nil)
	assert.Equal(t, "  engine: listening\n  engine: health: 503\n  ● llama-8b - ready\\x1b[2J\\rok\n", out.String(),
		"journalctl's own lines stay lines; within one, nothing drives the terminal")
	assertNoControl(t, out.String())

	out.Reset()
	printJournal(&out, nil, errors.New("exit status 1\x1b[2J"))
	assert.Equal(t, "  (journalctl: exit status 1\\x1b[2J)\n", out.String())
}

func TestListCellsAreEscaped(t *testing.T) {
	var out bytes.Buffer
	table(&out, [][]string{{"POOL", "MODEL", "STATE"}, {"llama-8b", "m\n● qwen - ready", "ready"}}, nil)
	assert.Equal(t, "POOL      MODEL              STATE\nllama-8b  m\\n● qwen - ready  ready\n", out.String())
}

func TestAFailureQuotingAnEngineIsOneEscapedLine(t *testing.T) {
	err := dbus.Error{Name: ifaces.ErrReloadFailed, Body: []any{"engine did not come up: " + forged}}
	assert.Equal(t, ifaces.ErrReloadFailed+": engine did not come up: "+escapedForged, failure(err))
	assert.Equal(t, "the engine did not come up: pool llama-8b is backoff: "+escapedForged,
		failure(mustFail(startSettled(progressLine{pool: "llama-8b", state: "backoff", lastErr: forged}))))
}

func mustFail(_ bool, err error) error { return err }

func TestEventsAndProgressLinesAreEscaped(t *testing.T) {
	var out bytes.Buffer
	c := &cli{stdout: &out}
	c.printChange(time.Time{}, change{Pool: "llama-8b\x1b[2J", Changed: map[string]dbus.Variant{"LastError": dbus.MakeVariant(forged)}})
	line := out.String()
	assert.Equal(t, 1, strings.Count(line, "\n"), line)
	assert.Contains(t, line, ` llama-8b\x1b[2J LastError="health: 503\n● llama-8b - ready\x1b[2J"`)
	assertNoControl(t, line)

	p := progressLine{verb: "reload", pool: "llama-8b", progress: -1}
	p.apply(map[string]dbus.Variant{"Operation": dbus.MakeVariant("staging\n\x1b[2J")})
	assert.Equal(t, `reload llama-8b: staging\n\x1b[2J (0s)`, p.String(0))
}

// --json escapes as JSON does, and stays JSON: a reader gets the text back.
func TestJSONOutputKeepsForgedTextAsJSON(t *testing.T) {
	m := map[string]dbus.Variant{"Id": dbus.MakeVariant("llama-8b"), "LastError": dbus.MakeVariant(forged)}
	raw := jsonObject(m)
	require.True(t, json.Valid(raw), "%s", raw)
	assert.NotContains(t, string(raw), "\n")
	assert.NotContains(t, string(raw), "\x1b")
	var back map[string]string
	require.NoError(t, json.Unmarshal(raw, &back))
	assert.Equal(t, forged, back["LastError"])
}

// What ssh or journalctl say on stderr reaches the terminal a line at a
// time, escaped, also a last line without a newline.
func TestMessagesOfOtherProgramsAreEscaped(t *testing.T) {
	var out bytes.Buffer
	e := &lineEscaper{w: &out}
	e.Write([]byte("ssh: connect to host gpu1 port 22: Connection refused\nWarning: " + forged[:9]))
	e.Write([]byte(forged[9:] + "\nlast\x1b]0;owned\x07"))
	assert.Equal(t, "ssh: connect to host gpu1 port 22: Connection refused\n", strings.SplitAfter(out.String(), "\n")[0])
	e.flush()
	assert.Equal(t, "ssh: connect to host gpu1 port 22: Connection refused\nWarning: health: 503\n● llama-8b - ready\\x1b[2J\nlast\\x1b]0;owned\\x07\n", out.String())
	assertNoControl(t, out.String())
}
