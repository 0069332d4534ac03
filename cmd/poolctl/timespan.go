package main

import (
	"fmt"
	"math"
	"strings"
	"time"
	"unicode"
)

// spanUnits are systemd's time-span units (systemd.time(7)); a number
// without one is seconds.
var spanUnits = map[string]time.Duration{
	"usec": time.Microsecond, "us": time.Microsecond, "μs": time.Microsecond,
	"msec": time.Millisecond, "ms": time.Millisecond,
	"seconds": time.Second, "second": time.Second, "sec": time.Second, "s": time.Second,
	"minutes": time.Minute, "minute": time.Minute, "min": time.Minute, "m": time.Minute,
	"hours": time.Hour, "hour": time.Hour, "hr": time.Hour, "h": time.Hour,
	"days": 24 * time.Hour, "day": 24 * time.Hour, "d": 24 * time.Hour,
	"weeks": 7 * 24 * time.Hour, "week": 7 * 24 * time.Hour, "w": 7 * 24 * time.Hour,
	"months": 2629800 * time.Second, "month": 2629800 * time.Second, "M": 2629800 * time.Second,
	"years": 31557600 * time.Second, "year": 31557600 * time.Second, "y": 31557600 * time.Second,
}

// parseSpan reads a time span as systemd does: "30s", "5min", "1h 30min",
// "1.5h", a bare number of seconds. The error says what in s is wrong.
func parseSpan(s string) (time.Duration, error) {
	rest := strings.TrimSpace(s)
	if rest == "" {
		return 0, fmt.Errorf("empty time span")
	}
	if strings.HasPrefix(rest, "-") {
		return 0, fmt.Errorf("time span %q is negative", s)
	}
	var total float64
	for rest != "" {
		i := 0
		for i < len(rest) && (rest[i] >= '0' && rest[i] <= '9' || rest[i] == '.') {
			i++
		}
		num := rest[:i]
		if num == "" || strings.Count(num, ".") > 1 || num == "." {
			return 0, fmt.Errorf("time span %q: expected a number at %q", s, rest)
		}
		var n float64
		if _, err := fmt.Sscanf(num, "%g", &n); err != nil {
			return 0, fmt.Errorf("time span %q: bad number %q", s, num)
		}
		rest = strings.TrimLeft(rest[i:], " \t")
		j := strings.IndexFunc(rest, func(r rune) bool { return !unicode.IsLetter(r) })
		if j < 0 {
			j = len(rest)
		}
		name := rest[:j]
		unit := time.Second
		if name != "" {
			u, ok := spanUnits[name]
			if !ok {
				return 0, fmt.Errorf("time span %q: unknown unit %q (use us, ms, s, min, h, d, w, M, y)", s, name)
			}
			unit = u
		}
		total += n * float64(unit)
		if total >= math.MaxInt64 {
			return 0, fmt.Errorf("time span %q is too long", s)
		}
		rest = strings.TrimLeft(rest[j:], " \t")
	}
	return time.Duration(total), nil
}

// spanFlag is an option whose value is a time span.
type spanFlag struct{ d *time.Duration }

func (f spanFlag) String() string {
	if f.d == nil {
		return ""
	}
	return span(*f.d)
}

func (f spanFlag) Set(s string) error {
	d, err := parseSpan(s)
	if err != nil {
		return err
	}
	*f.d = d
	return nil
}
