// Package safetext makes text that came from outside the daemon (an
// engine's output or health answer, a file name, a caller's argument) safe
// to publish: the bus rejects invalid UTF-8 and NUL outright, a terminal
// obeys control sequences, and a client should not have to read megabytes
// for one property.
package safetext

import (
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Max is the most bytes Bound returns.
const Max = 1024

// cutMark ends a string that Bound shortened.
const cutMark = "…"

// Bound returns s as valid UTF-8 of at most Max bytes: each invalid byte
// becomes U+FFFD, a control character other than tab and newline (and a
// bidirectional override, which can make text read other than it is)
// becomes a visible escape such as \x1b, and a longer result is cut at a
// character boundary and ends in "…". Bound(Bound(s)) == Bound(s), and
// short clean text is returned as it is.
func Bound(s string) string {
	if len(s) <= Max && clean(s) {
		return s
	}
	var b strings.Builder
	cut := -1 // where the result ends if it must be cut: the mark still fits
	for _, r := range s {
		piece := render(r)
		if cut < 0 && b.Len()+len(piece) > Max-len(cutMark) {
			cut = b.Len()
		}
		b.WriteString(piece)
		if b.Len() > Max {
			return b.String()[:cut] + cutMark
		}
	}
	return b.String()
}

// clean reports whether Bound would leave every character of s as it is.
func clean(s string) bool {
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c < 0x20 && c != '\t' && c != '\n' || c == 0x7f {
				return false
			}
			i++
			continue
		}
		r, n := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && n == 1 || escaped(r) {
			return false
		}
		i += n
	}
	return true
}

// render is how one decoded character (utf8.RuneError for an invalid
// byte) appears in the result.
func render(r rune) string {
	switch {
	case r == '\t' || r == '\n':
		return string(r)
	case r < 0x80 && escaped(r):
		return fmt.Sprintf(`\x%02x`, r)
	case escaped(r):
		return fmt.Sprintf(`\u%04x`, r)
	}
	return string(r)
}

func escaped(r rune) bool {
	return r != '\t' && r != '\n' && (unicode.IsControl(r) || unicode.Is(unicode.Bidi_Control, r))
}

// Line returns s as one line for a terminal: like Bound, but newline, tab
// and carriage return are escaped too (\n, \t, \r), so that text from
// outside cannot start a line of its own, and s is not cut. Clean text is
// returned as it is.
func Line(s string) string {
	if lineClean(s) {
		return s
	}
	var b strings.Builder
	for _, r := range s {
		switch r {
		case '\n':
			b.WriteString(`\n`)
		case '\t':
			b.WriteString(`\t`)
		case '\r':
			b.WriteString(`\r`)
		default:
			b.WriteString(render(r))
		}
	}
	return b.String()
}

func lineClean(s string) bool {
	return clean(s) && !strings.ContainsAny(s, "\n\t")
}
