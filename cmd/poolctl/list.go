package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/unit"
	"github.com/godbus/dbus/v5"

	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/safetext"
)

// all reads every pool's properties, in ListPools' order.
func (c *cli) all() ([]poolRef, []map[string]dbus.Variant, error) {
	refs, err := c.listPools()
	if err != nil {
		return nil, nil, err
	}
	conn, _ := c.bus()
	var out []map[string]dbus.Variant
	var kept []poolRef
	for _, r := range refs {
		var m map[string]dbus.Variant
		err := conn.Object(busName, r.Path).Call("org.freedesktop.DBus.Properties.GetAll", 0, poolIface).Store(&m)
		if err != nil {
			// A pool removed since ListPools answered is no longer listed.
			var de dbus.Error
			if errors.As(err, &de) && strings.HasPrefix(de.Name, "org.freedesktop.DBus.Error.Unknown") {
				continue
			}
			return nil, nil, fmt.Errorf("pool %s: %w", r.ID, err)
		}
		kept = append(kept, r)
		out = append(out, m)
	}
	return kept, out, nil
}

// hostPools is what one host answered for list.
type hostPools struct {
	host  string
	refs  []poolRef
	pools []map[string]dbus.Variant
}

func (c *cli) list(_ []string) error {
	var all []hostPools
	failed := 0
	if len(c.hosts) > 1 {
		// The fleet view: each host in turn, one table; a host that
		// cannot be read is said and the others are still shown.
		for _, h := range c.hosts {
			c.host = h
			refs, pools, err := c.all()
			c.disconnect()
			if err != nil {
				fmt.Fprintf(c.stderr, "poolctl: %s: %s\n", safetext.Line(h), failure(err))
				failed++
				continue
			}
			all = append(all, hostPools{h, refs, pools})
		}
	} else {
		refs, pools, err := c.all()
		if err != nil {
			return err
		}
		all = append(all, hostPools{c.host, refs, pools})
	}
	fleet := len(c.hosts) > 1
	if c.json {
		objs := []json.RawMessage{}
		for _, hp := range all {
			for _, m := range hp.pools {
				if fleet {
					m = maps.Clone(m)
					m["Host"] = dbus.MakeVariant(hp.host)
				}
				objs = append(objs, jsonObject(m))
			}
		}
		printJSON(c.stdout, objs)
	} else {
		c.printList(all, fleet)
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d hosts could not be read", failed, len(c.hosts))
	}
	return nil
}

func (c *cli) printList(all []hostPools, fleet bool) {
	now := time.Now()
	head := []string{"POOL", "STATE", "READY", "LEASES", "MODEL", "GPUS", "CRASHES", "RESTARTS", "BREAKER", "UPTIME"}
	if fleet {
		head = append([]string{"HOST"}, head...)
	}
	rows := [][]string{head}
	n := 0
	for _, hp := range all {
		for i, m := range hp.pools {
			slots := "-"
			if n := value[uint32](m, "Slots"); n > 0 {
				slots = strconv.FormatUint(uint64(n), 10)
			}
			id := value[string](m, "Id")
			if id == "" {
				id = hp.refs[i].ID
			}
			up := uptime(m, now)
			if hp.host != "" {
				up = "-" // the engine's process is on another host
			}
			row := []string{
				id, idleFor(m, now, false), yesNo(value[bool](m, "Ready")),
				fmt.Sprintf("%d/%s", value[uint32](m, "ActiveLeases"), slots),
				dash(value[string](m, "Model")), dash(value[string](m, "DeviceMask")),
				strconv.FormatUint(uint64(value[uint32](m, "CrashCount")), 10),
				strconv.FormatUint(uint64(value[uint32](m, "RestartCount")), 10),
				dash(value[string](m, "BreakerState")), up,
			}
			if fleet {
				row = append([]string{hp.host}, row...)
			}
			rows = append(rows, row)
			n++
		}
	}
	stateCol := 1
	if fleet {
		stateCol = 2
	}
	var paint func(int, int, string) string
	if c.colour() {
		paint = func(row, col int, cell string) string {
			if row > 0 && col == stateCol {
				if code := stateColour(cell); code != "" {
					return code + cell + reset
				}
			}
			return cell
		}
	}
	table(c.stdout, rows, paint)
	plural := "s"
	if n == 1 {
		plural = ""
	}
	fmt.Fprintf(c.stdout, "\n%d pool%s listed.\n", n, plural)
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func (c *cli) status(args []string) error {
	id := args[0]
	m, err := c.props(id)
	if err != nil {
		return err
	}
	if c.json {
		printJSON(c.stdout, jsonObject(m))
		return nil
	}
	c.printStatus(id, m, time.Now())

	scope := scopeOf(id, m)
	// Only the daemon's own entries: any local user may log a POOL_ID=;
	// _SYSTEMD_UNIT is journald's word on the sender's cgroup, and only
	// root's processes run in pool-managerd.service.
	c.journal("pool-managerd about "+id, "-b", "-o", "cat", "_SYSTEMD_UNIT="+daemonUnit, journal.PoolID+"="+id)
	c.journal(scope, "-b", "-u", scope)
	return nil
}

// scopeOf is the unit of the pool's engine.
func scopeOf(id string, m map[string]dbus.Variant) string {
	if u := value[string](m, "Unit"); u != "" {
		return u
	}
	return "pool-engine-" + unit.UnitNameEscape(id) + ".scope"
}

// printStatus writes the pool's properties, one a line: every value may
// quote an engine (LastError, Model), so none may break its line or
// drive the terminal.
func (c *cli) printStatus(id string, m map[string]dbus.Variant, now time.Time) {
	state := value[string](m, "State")
	dot := "●"
	if c.colour() {
		if code := stateColour(state); code != "" {
			dot = code + dot + reset
		}
	}
	fmt.Fprintf(c.stdout, "%s %s - %s\n", dot, safetext.Line(id), safetext.Line(idleFor(m, now, true)))
	names := ordered(m)
	width := len("Uptime")
	for _, n := range names {
		width = max(width, len(n))
	}
	for _, n := range names {
		v := human(n, m[n], now)
		if n == "Progress" && value[string](m, "Operation") == "" {
			v = "-" // of no operation
		}
		if n == "State" {
			v = idleFor(m, now, true)
		}
		fmt.Fprintf(c.stdout, "%*s: %s\n", width, safetext.Line(n), safetext.Line(v))
	}
	up := uptime(m, now)
	if c.host != "" {
		up = "-" // the engine's process is on another host
	}
	fmt.Fprintf(c.stdout, "%*s: %s\n", width, "Uptime", up)
}

// daemonUnit is the unit the packages install the daemon as.
const daemonUnit = "pool-managerd.service"

// journal prints the last lines journalctl has for the match; a journal
// it cannot read is said, not a failure of status.
func (c *cli) journal(title string, match ...string) {
	fmt.Fprintf(c.stdout, "\nJournal of %s:\n", safetext.Line(title))
	cmd := c.journalctl(append(match, "-n", "10", "--no-pager")...)
	out, err := cmd.CombinedOutput()
	printJournal(c.stdout, out, err)
}

// journalctl runs journalctl here, or on the host of -H through ssh.
func (c *cli) journalctl(args ...string) *exec.Cmd {
	if c.host != "" {
		return remoteCommand(c.host, append([]string{"journalctl"}, args...))
	}
	cmd := exec.Command("journalctl", args...)
	cmd.Env = append(os.Environ(), "SYSTEMD_COLORS=0", "SYSTEMD_PAGER=")
	return cmd
}

// printJournal writes journalctl's answer indented: an engine writes what
// it likes to its journal, so each line is escaped.
func printJournal(w io.Writer, out []byte, err error) {
	text := strings.TrimRight(string(out), "\n")
	switch {
	case err != nil && text == "":
		fmt.Fprintf(w, "  (journalctl: %s)\n", safetext.Line(err.Error()))
	case text == "":
		fmt.Fprintln(w, "  (no entries)")
	default:
		for _, line := range strings.Split(text, "\n") {
			fmt.Fprintln(w, "  "+safetext.Line(line))
		}
	}
}
