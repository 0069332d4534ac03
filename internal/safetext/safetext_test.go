package safetext_test

import (
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/safetext"
)

func TestBound(t *testing.T) {
	long := strings.Repeat("é", 600) // 1200 bytes
	for _, c := range []struct {
		name, in, want string
	}{
		{"short clean text is kept", "exited with status 1", "exited with status 1"},
		{"tab and newline are kept", "a\tb\nc", "a\tb\nc"},
		{"empty", "", ""},
		{"invalid bytes become U+FFFD", "answered 503 \xff\xfe!", "answered 503 \ufffd\ufffd!"},
		{"a truncated sequence becomes U+FFFD", "caf\xc3", "caf\ufffd"},
		{"NUL, which the bus refuses, is escaped", "a\x00b", `a\x00b`},
		{"terminal escapes are escaped", "\x1b[31mred\r", `\x1b[31mred\x0d`},
		{"DEL and C1 controls are escaped", "\x7f\u0085", `\x7f\u0085`},
		{"a bidirectional override is escaped", "abc\u202edef", `abc\u202edef`},
		{"exactly Max bytes is kept", strings.Repeat("x", safetext.Max), strings.Repeat("x", safetext.Max)},
		{"longer is cut and marked", strings.Repeat("x", safetext.Max+1), strings.Repeat("x", safetext.Max-3) + "…"},
		{"the cut falls between characters", long, strings.Repeat("é", (safetext.Max-3)/2) + "…"},
		{"replacements count toward the bound", strings.Repeat("\xff", 400), strings.Repeat("\ufffd", (safetext.Max-3)/3) + "…"},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := safetext.Bound(c.in)
			assert.Equal(t, c.want, got)
			assert.True(t, utf8.ValidString(got))
			assert.LessOrEqual(t, len(got), safetext.Max)
		})
	}
}

func TestBoundDoesNotCopyCleanText(t *testing.T) {
	s := strings.Repeat("ready ", 100)
	require.Equal(t, 0.0, testing.AllocsPerRun(100, func() { safetext.Bound(s) }))
}

func FuzzBound(f *testing.F) {
	for _, s := range []string{"", "ok", "a\x00b", "\xff\xfe", "\x1b[2J", "\u202e", strings.Repeat("é", 700), strings.Repeat("\xff", 400) + "x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got := safetext.Bound(s)
		if !utf8.ValidString(got) {
			t.Fatalf("Bound(%q) = %q: not valid UTF-8", s, got)
		}
		if len(got) > safetext.Max {
			t.Fatalf("Bound(%q) is %d bytes", s, len(got))
		}
		if strings.ContainsRune(got, 0) {
			t.Fatalf("Bound(%q) = %q contains NUL", s, got)
		}
		if again := safetext.Bound(got); again != got {
			t.Fatalf("Bound is not idempotent: %q, then %q", got, again)
		}
		if len(s) <= safetext.Max && utf8.ValidString(s) && !strings.ContainsFunc(s, func(r rune) bool {
			return r < 0x20 && r != '\t' && r != '\n' || r >= 0x7f && r <= 0x9f || r >= 0x202a && r <= 0x202e || r >= 0x2066 && r <= 0x2069 || r == 0x200e || r == 0x200f || r == 0x061c
		}) && got != s {
			t.Fatalf("short clean %q changed to %q", s, got)
		}
	})
}

func TestLine(t *testing.T) {
	for _, c := range []struct {
		name, in, want string
	}{
		{"clean text is kept", "exited with status 1", "exited with status 1"},
		{"a newline cannot start a forged line", "boom\n● qwen - ready", `boom\n● qwen - ready`},
		{"tab and carriage return are escaped", "a\tb\rc", `a\tb\rc`},
		{"terminal escapes are escaped", "\x1b[2J\x1b]0;x\x07", `\x1b[2J\x1b]0;x\x07`},
		{"invalid bytes become U+FFFD", "a\xffb", "a\ufffdb"},
		{"a bidirectional override is escaped", "abc\u202edef", `abc\u202edef`},
		{"long text is not cut", strings.Repeat("x", 3*safetext.Max), strings.Repeat("x", 3*safetext.Max)},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := safetext.Line(c.in)
			assert.Equal(t, c.want, got)
			assert.Equal(t, got, safetext.Line(got), "idempotent")
		})
	}
}

func FuzzLine(f *testing.F) {
	for _, s := range []string{"", "ok", "a\nb", "\x1b[2J", "\r\t", "\xff", "\u202e"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got := safetext.Line(s)
		if !utf8.ValidString(got) {
			t.Fatalf("Line(%q) = %q: not valid UTF-8", s, got)
		}
		if strings.ContainsFunc(got, func(r rune) bool {
			return r < 0x20 || r >= 0x7f && r <= 0x9f || r >= 0x202a && r <= 0x202e || r >= 0x2066 && r <= 0x2069
		}) {
			t.Fatalf("Line(%q) = %q keeps a control character", s, got)
		}
		if again := safetext.Line(got); again != got {
			t.Fatalf("Line is not idempotent: %q, then %q", got, again)
		}
	})
}
