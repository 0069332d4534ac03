package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/godbus/dbus/v5"
	"golang.org/x/sys/unix"

	"github.com/llorch/pool-managerd/internal/safetext"
)

// colourTerminal says whether w is a terminal: live progress lines and
// colour are for people, never for a pipe or a file.
func colourTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// colour says whether to colour what goes to the terminal (NO_COLOR and
// TERM=dumb turn it off, as in systemctl).
func (c *cli) colour() bool {
	return c.tty && os.Getenv("NO_COLOR") == "" && os.Getenv("TERM") != "dumb"
}

const (
	green  = "\x1b[0;1;32m"
	yellow = "\x1b[0;1;33m"
	red    = "\x1b[0;1;31m"
	reset  = "\x1b[0m"
)

// stateColour is how systemctl would colour a pool's state.
func stateColour(state string) string {
	switch state {
	case "ready":
		return green
	case "starting", "warming", "draining":
		return yellow
	case "backoff", "failed":
		return red
	}
	return ""
}

// value reads a property, the zero value when absent or of another type.
func value[T any](m map[string]dbus.Variant, k string) T {
	v, _ := m[k].Value().(T)
	return v
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// human is a property's value as status shows it.
func human(name string, v dbus.Variant, now time.Time) string {
	switch x := v.Value().(type) {
	case bool:
		return yesNo(x)
	case float64:
		if name == "Progress" {
			if x < 0 || math.IsNaN(x) {
				return "-"
			}
			return percent(x)
		}
		return strconv.FormatFloat(x, 'g', -1, 64)
	case uint64:
		if strings.HasSuffix(name, "USec") {
			if x == 0 {
				return "-"
			}
			at := time.UnixMicro(int64(x))
			rel := "ago"
			d := at.Sub(now)
			if d >= 0 {
				rel = "in " + span(d)
			} else {
				rel = span(-d) + " ago"
			}
			return at.Format("Mon 2006-01-02 15:04:05 MST") + "; " + rel
		}
		return strconv.FormatUint(x, 10)
	case uint32:
		if name == "MainPID" && x == 0 {
			return "-"
		}
		return strconv.FormatUint(uint64(x), 10)
	case string:
		return x
	}
	return fmt.Sprint(v.Value())
}

// raw is a property's value as one word of an events line: strings quoted
// when empty or when they hold spaces, quotes or control characters.
func raw(v dbus.Variant) string {
	switch x := v.Value().(type) {
	case string:
		if x == "" || strings.ContainsFunc(x, func(r rune) bool { return unicode.IsSpace(r) || r == '"' || r == '=' || !unicode.IsPrint(r) }) {
			return strconv.Quote(x)
		}
		return x
	case float64:
		return strconv.FormatFloat(x, 'f', -1, 64)
	}
	return fmt.Sprint(v.Value())
}

func percent(x float64) string {
	return strconv.Itoa(int(math.Floor(x*100))) + "%"
}

// jsonObject writes m as a JSON object with its keys in the interface's
// order; a value JSON cannot hold (NaN) is null.
func jsonObject(m map[string]dbus.Variant) json.RawMessage {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, k := range ordered(m) {
		if i > 0 {
			b.WriteByte(',')
		}
		key, _ := json.Marshal(k)
		val, err := json.Marshal(m[k].Value())
		if err != nil {
			val = []byte("null")
		}
		b.Write(key)
		b.WriteByte(':')
		b.Write(val)
	}
	b.WriteByte('}')
	return b.Bytes()
}

// span is a duration as systemd writes one: its two largest units.
func span(d time.Duration) string {
	units := []struct {
		name string
		d    time.Duration
	}{{"d", 24 * time.Hour}, {"h", time.Hour}, {"min", time.Minute}, {"s", time.Second}}
	if d <= 0 {
		return "0s"
	}
	if d < time.Second {
		return strconv.FormatInt(d.Milliseconds(), 10) + "ms"
	}
	var parts []string
	for _, u := range units {
		if d >= u.d {
			parts = append(parts, strconv.FormatInt(int64(d/u.d), 10)+u.name)
			d %= u.d
		}
		if len(parts) == 2 {
			break
		}
	}
	return strings.Join(parts, " ")
}

// clockTicks is USER_HZ, 100 on every Linux architecture Go supports.
const clockTicks = 100

// started is when process pid started, from /proc (the kernel's count of
// clock ticks since boot, and the boot time).
func started(proc string, pid uint32) (time.Time, bool) {
	if pid == 0 {
		return time.Time{}, false
	}
	stat, err := os.ReadFile(fmt.Sprintf("%s/%d/stat", proc, pid))
	if err != nil {
		return time.Time{}, false
	}
	// The command name, in parentheses, may hold spaces and parentheses.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return time.Time{}, false
	}
	fields := strings.Fields(string(stat[i+1:]))
	// fields[0] is field 3 (state); starttime is field 22.
	if len(fields) < 20 {
		return time.Time{}, false
	}
	ticks, err := strconv.ParseUint(fields[19], 10, 64)
	if err != nil {
		return time.Time{}, false
	}
	all, err := os.ReadFile(proc + "/stat")
	if err != nil {
		return time.Time{}, false
	}
	for _, line := range strings.Split(string(all), "\n") {
		if v, ok := strings.CutPrefix(line, "btime "); ok {
			boot, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err != nil {
				return time.Time{}, false
			}
			return time.Unix(boot, 0).Add(time.Duration(ticks) * time.Second / clockTicks), true
		}
	}
	return time.Time{}, false
}

// uptime is how long the pool's main process has run, "-" without one.
func uptime(m map[string]dbus.Variant, now time.Time) string {
	at, ok := started("/proc", value[uint32](m, "MainPID"))
	if !ok {
		return "-"
	}
	if now.Before(at) {
		return "0s"
	}
	return span(now.Sub(at).Truncate(time.Second))
}

// table writes rows in columns two spaces apart, each cell escaped (a
// pool's model or state may quote an engine); paint, when set, colours a
// cell after its width is counted.
func table(w io.Writer, rows [][]string, paint func(row, col int, cell string) string) {
	widths := map[int]int{}
	for _, r := range rows {
		for i, cell := range r {
			widths[i] = max(widths[i], utf8.RuneCountInString(safetext.Line(cell)))
		}
	}
	for ri, r := range rows {
		var line strings.Builder
		for i, cell := range r {
			cell = safetext.Line(cell)
			pad := ""
			if i < len(r)-1 {
				pad = strings.Repeat(" ", widths[i]-utf8.RuneCountInString(cell)+2)
			}
			if paint != nil {
				cell = paint(ri, i, cell)
			}
			line.WriteString(cell + pad)
		}
		fmt.Fprintln(w, strings.TrimRight(line.String(), " "))
	}
}

// printJSON writes v as indented JSON, the one format of every command's
// --json (events aside: a line per event).
func printJSON(w io.Writer, v any) {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		b = []byte("null")
	}
	fmt.Fprintf(w, "%s\n", b)
}
