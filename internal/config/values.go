package config

import (
	"errors"
	"fmt"
	"math"
	"regexp"
	"strconv"
	"strings"
	"time"
	"unicode"
)

// parseBool accepts what systemd's parse_boolean accepts.
func parseBool(v string) (bool, error) {
	switch strings.ToLower(v) {
	case "1", "yes", "y", "true", "t", "on":
		return true, nil
	case "0", "no", "n", "false", "f", "off":
		return false, nil
	}
	return false, fmt.Errorf("%q is not a boolean (yes/no, true/false, on/off, 1/0)", v)
}

func parseInt(v string, lo, hi int64) (int64, error) {
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%q is not an integer", v)
	}
	if n < lo || n > hi {
		return 0, fmt.Errorf("%d is out of range [%d, %d]", n, lo, hi)
	}
	return n, nil
}

func parseFloat(v string, lo, hi float64) (float64, error) {
	f, err := strconv.ParseFloat(v, 64)
	if err != nil || math.IsNaN(f) || math.IsInf(f, 0) {
		return 0, fmt.Errorf("%q is not a number", v)
	}
	if f < lo || f > hi {
		return 0, fmt.Errorf("%g is out of range [%g, %g]", f, lo, hi)
	}
	return f, nil
}

var timeUnits = map[string]time.Duration{
	"us": time.Microsecond, "usec": time.Microsecond, "µs": time.Microsecond,
	"ms": time.Millisecond, "msec": time.Millisecond,
	"s": time.Second, "sec": time.Second, "second": time.Second, "seconds": time.Second,
	"m": time.Minute, "min": time.Minute, "minute": time.Minute, "minutes": time.Minute,
	"h": time.Hour, "hr": time.Hour, "hour": time.Hour, "hours": time.Hour,
	"d": 24 * time.Hour, "day": 24 * time.Hour, "days": 24 * time.Hour,
	"w": 7 * 24 * time.Hour, "week": 7 * 24 * time.Hour, "weeks": 7 * 24 * time.Hour,
}

// maxSpan keeps every duration far from overflow; nothing here waits a year.
const maxSpan = 365 * 24 * time.Hour

// parseSeconds reads a *Sec= value the way systemd does: a bare number is
// seconds (fractions allowed), or a time span such as "500ms" or "1min 30s".
func parseSeconds(v string) (time.Duration, error) {
	if v == "" {
		return 0, errors.New("empty time span")
	}
	if f, err := strconv.ParseFloat(v, 64); err == nil {
		if math.IsNaN(f) || f < 0 || f > maxSpan.Seconds() {
			return 0, fmt.Errorf("%q is not a time span between 0 and a year", v)
		}
		return time.Duration(f * float64(time.Second)), nil
	}
	var total time.Duration
	rest := strings.TrimSpace(v)
	for rest != "" {
		i := strings.IndexFunc(rest, func(r rune) bool { return !(unicode.IsDigit(r) || r == '.') })
		if i <= 0 {
			return 0, fmt.Errorf("%q is not a time span (e.g. 30, 500ms, 1min 30s)", v)
		}
		num := rest[:i]
		rest = strings.TrimLeft(rest[i:], " ")
		j := strings.IndexFunc(rest, func(r rune) bool { return unicode.IsDigit(r) || r == ' ' || r == '.' })
		if j < 0 {
			j = len(rest)
		}
		unit, ok := timeUnits[rest[:j]]
		if !ok {
			return 0, fmt.Errorf("%q is not a time span: unknown unit %q", v, rest[:j])
		}
		rest = strings.TrimLeft(rest[j:], " ")
		f, err := strconv.ParseFloat(num, 64)
		if err != nil || f*float64(unit) > float64(maxSpan) {
			return 0, fmt.Errorf("%q is not a time span between 0 and a year", v)
		}
		total += time.Duration(f * float64(unit))
		if total > maxSpan {
			return 0, fmt.Errorf("%q is not a time span between 0 and a year", v)
		}
	}
	return total, nil
}

// splitWords splits a command line or assignment list like systemd does:
// words separated by blanks, double or single quotes group, a backslash
// escapes the next character.
func splitWords(s string) ([]string, error) {
	var words []string
	var cur strings.Builder
	in := false
	var quote rune
	runes := []rune(s)
	for i := 0; i < len(runes); i++ {
		r := runes[i]
		switch {
		case r == '\\':
			if i+1 >= len(runes) {
				return nil, errors.New("trailing backslash")
			}
			i++
			cur.WriteRune(runes[i])
			in = true
		case quote != 0:
			if r == quote {
				quote = 0
			} else {
				cur.WriteRune(r)
			}
		case r == '"' || r == '\'':
			quote = r
			in = true
		case r == ' ' || r == '\t' || r == '\n':
			if in {
				words = append(words, cur.String())
				cur.Reset()
				in = false
			}
		default:
			cur.WriteRune(r)
			in = true
		}
	}
	if quote != 0 {
		return nil, fmt.Errorf("unterminated %c quote", quote)
	}
	if in {
		words = append(words, cur.String())
	}
	return words, nil
}

// checkSpecifiers reports a % that is not one of the pool specifiers.
func checkSpecifiers(s string) error {
	for i := 0; i < len(s); i++ {
		if s[i] != '%' {
			continue
		}
		if i+1 >= len(s) {
			return errors.New("lone % at the end (write %% for a percent sign)")
		}
		switch s[i+1] {
		case 'i', 'm', 'p', 'd', '%':
			i++
		default:
			return fmt.Errorf("unknown specifier %%%c (known: %%i pool id, %%m model path, %%p port, %%d device mask, %%%% percent sign)", s[i+1])
		}
	}
	return nil
}

// Specifiers are the values %i, %m, %p and %d stand for.
type Specifiers struct {
	ID, Model, Port, Devices string
}

// Expand replaces the specifiers in s. It assumes checkSpecifiers passed.
func (sp Specifiers) Expand(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '%' || i+1 >= len(s) {
			b.WriteByte(s[i])
			continue
		}
		i++
		switch s[i] {
		case 'i':
			b.WriteString(sp.ID)
		case 'm':
			b.WriteString(sp.Model)
		case 'p':
			b.WriteString(sp.Port)
		case 'd':
			b.WriteString(sp.Devices)
		case '%':
			b.WriteByte('%')
		default:
			b.WriteByte('%')
			b.WriteByte(s[i])
		}
	}
	return b.String()
}

var (
	poolIDRe  = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)
	envNameRe = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
	// Like useradd's default NAME_REGEX, plus the numeric ids systemd takes.
	userRe    = regexp.MustCompile(`^([a-z_][a-z0-9_-]{0,30}\$?|[0-9]+)$`)
	uuidRe    = regexp.MustCompile(`^(GPU|MIG)-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)
	legacyMIG = regexp.MustCompile(`^MIG-GPU-[0-9a-fA-F-]{36}/[0-9]+/[0-9]+$`)
	digestRe  = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)
)

// ValidPoolID reports whether id is a valid pool id.
func ValidPoolID(id string) bool { return poolIDRe.MatchString(id) }

// parseDevice checks one Devices= entry: an NVML index, a GPU UUID or a MIG
// UUID (either format NVIDIA has used).
func parseDevice(s string) error {
	if s == "" {
		return errors.New("empty device")
	}
	if s[0] >= '0' && s[0] <= '9' {
		if _, err := parseInt(s, 0, 1023); err != nil {
			return fmt.Errorf("device %q: %w", s, err)
		}
		return nil
	}
	if uuidRe.MatchString(s) || legacyMIG.MatchString(s) {
		return nil
	}
	return fmt.Errorf("device %q is not a GPU index, a GPU-<uuid> or a MIG-<uuid>", s)
}

// isMIG says whether a device is a MIG device by its UUID (either format).
func isMIG(dev string) bool { return len(dev) >= 4 && strings.EqualFold(dev[:4], "MIG-") }

// didYouMean suggests the choice v was likely meant as (the same but for
// case, or sharing its first three letters): ": did you mean X?", or "".
func didYouMean(v string, choices ...string) string {
	l := strings.ToLower(strings.TrimSpace(v))
	for _, c := range choices {
		n := 0
		for n < len(l) && n < len(c) && l[n] == c[n] {
			n++
		}
		if l != "" && (n == len(l) || n == len(c) || n >= 3) {
			return fmt.Sprintf(": did you mean %s?", c)
		}
	}
	return ""
}

// Ranges an EngineUIDs= range must keep out of: uids others hand out or
// that mean something special.
var reservedUIDs = []struct {
	first, last uint64
	what        string
}{
	{0, 999, "root and the system users"},
	{61184, 65519, "systemd's DynamicUser= range"},
	{65534, 65535, "nobody and the 16-bit -1"},
	{524288, 1879048191, "systemd's container range"},
	{2147483648, 4294967295, "uids above 2^31-1, which tools read as negative"},
}

// parseUIDRange reads EngineUIDs=FIRST-LAST.
func parseUIDRange(v string) (UIDRange, error) {
	a, b, ok := strings.Cut(v, "-")
	if !ok {
		return UIDRange{}, fmt.Errorf("%q is not FIRST-LAST (e.g. %d-%d)", v, DefaultEngineUIDs.First, DefaultEngineUIDs.Last)
	}
	first, err1 := strconv.ParseUint(strings.TrimSpace(a), 10, 32)
	last, err2 := strconv.ParseUint(strings.TrimSpace(b), 10, 32)
	if err1 != nil || err2 != nil {
		return UIDRange{}, fmt.Errorf("%q is not FIRST-LAST of two uids (0 to 4294967294)", v)
	}
	if first > last {
		return UIDRange{}, fmt.Errorf("%q: the first uid %d is above the last %d", v, first, last)
	}
	for _, r := range reservedUIDs {
		if first <= r.last && last >= r.first {
			return UIDRange{}, fmt.Errorf("%q overlaps %d-%d, %s", v, r.first, r.last, r.what)
		}
	}
	return UIDRange{First: uint32(first), Last: uint32(last)}, nil
}
