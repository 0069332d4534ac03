package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/godbus/dbus/v5"

	ifaces "github.com/llorch/pool-managerd/dbus"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/safetext"
)

// show prints properties as systemctl show does: NAME=VALUE, one a line;
// -p picks some, --value drops the names.
func (c *cli) show(args []string) error {
	id := args[0]
	m, err := c.props(id)
	if err != nil {
		return err
	}
	names := ordered(m)
	if len(c.propNames) > 0 {
		names = nil
		for _, n := range c.propNames {
			if _, ok := m[n]; !ok {
				return fmt.Errorf("pool %s has no property %q (poolctl show %s lists them)", id, n, id)
			}
			names = append(names, n)
		}
	}
	if c.json {
		picked := map[string]dbus.Variant{}
		for _, n := range names {
			picked[n] = m[n]
		}
		printJSON(c.stdout, jsonObject(picked))
		return nil
	}
	for _, n := range names {
		v := safetext.Line(showValue(m[n]))
		if c.valueOnly {
			fmt.Fprintln(c.stdout, v)
		} else {
			fmt.Fprintf(c.stdout, "%s=%s\n", safetext.Line(n), v)
		}
	}
	return nil
}

// showValue is a value as show prints it, for scripts: booleans yes and
// no as systemctl's, numbers as they are (microseconds for *USec).
func showValue(v dbus.Variant) string {
	switch x := v.Value().(type) {
	case bool:
		return yesNo(x)
	case float64:
		return strconv.FormatFloat(x, 'f', -1, 64)
	case string:
		return x
	}
	return fmt.Sprint(v.Value())
}

// logs prints the daemon's entries about the pool and its engine's, in
// this boot, merged by journalctl in time order.
func (c *cli) logs(args []string) error {
	id := args[0]
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(stop)
	m, err := c.props(id)
	if err != nil {
		return err
	}
	argv := append([]string{"-b", "--no-pager"}, logArgs(id, scopeOf(id, m), c.lines, c.followLog)...)
	cmd := c.journalctl(argv...)
	esc := &lineEscaper{w: c.stderr}
	defer esc.flush()
	cmd.Stderr = esc
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("cannot run journalctl: %w", err)
	}
	interrupted, ended := make(chan struct{}), make(chan struct{})
	defer close(ended)
	go func() {
		select {
		case <-stop:
			close(interrupted)
			cmd.Process.Signal(syscall.SIGTERM)
		case <-ended:
		}
	}()
	copyLines(c.stdout, out)
	err = cmd.Wait()
	select {
	case <-interrupted:
		return nil // -f ends so
	default:
	}
	if err != nil {
		return fmt.Errorf("journalctl: %w", err)
	}
	return nil
}

// logArgs are journalctl's matches for a pool: the daemon's own entries
// about it (not any user's POOL_ID=: only root's processes run in the
// daemon's unit), its engine's scope, and systemd's lines about the scope.
func logArgs(id, scope, lines string, follow bool) []string {
	var a []string
	if lines != "" {
		a = append(a, "-n", lines)
	}
	if follow {
		a = append(a, "-f")
	}
	return append(a, "_SYSTEMD_UNIT="+daemonUnit, journal.PoolID+"="+id,
		"+", "_SYSTEMD_UNIT="+scope,
		"+", "_PID=1", "UNIT="+scope)
}

// copyLines copies journalctl's lines, each escaped: an engine writes
// what it likes to its journal. A line of any length is copied whole.
func copyLines(w io.Writer, r io.Reader) {
	br := bufio.NewReader(r)
	for {
		line, err := br.ReadString('\n')
		if line != "" {
			fmt.Fprintln(w, safetext.Line(strings.TrimSuffix(line, "\n")))
		}
		if err != nil {
			return
		}
	}
}

// isReady answers with its exit status alone, as systemctl is-active -q.
func (c *cli) isReady(args []string) error {
	m, err := c.props(args[0])
	if err != nil {
		return err
	}
	if value[bool](m, "Ready") {
		return nil
	}
	return quietFailure
}

// wait returns once the pool is in the state asked for.
func (c *cli) wait(args []string) error {
	id, want := args[0], c.waitFor
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(stop)
	sigs, own, err := c.watch(ifaces.PoolPath(id))
	if err != nil {
		return err
	}
	state := ""
	reread := func() error {
		m, err := c.props(id)
		if err != nil {
			return err
		}
		state = value[string](m, "State")
		return nil
	}
	// Subscribed first: no change between the read and the wait is lost.
	if err := reread(); err != nil {
		return err
	}
	var expired <-chan time.Time
	if c.timeout > 0 {
		t := time.NewTimer(c.timeout)
		defer t.Stop()
		expired = t.C
	}
	for state != want {
		select {
		case s := <-sigs:
			switch ch := classify(s, own).(type) {
			case change:
				if v, ok := ch.Changed["State"]; ok && ch.Pool == id {
					state, _ = v.Value().(string)
				}
			case ownerChange:
				// A daemon back on the bus: its pool as it is now. One
				// gone may come back; --timeout bounds the wait.
				if ch.new != "" {
					if err := reread(); err != nil {
						return err
					}
				}
			}
		case <-expired:
			return fmt.Errorf("pool %s is %s, not %s, after %s", id, state, want, span(c.timeout))
		case <-stop:
			return errInterrupted
		}
	}
	return nil
}

// daemonReload asks the daemon to read its configuration again.
func (c *cli) daemonReload(_ []string) error {
	var warnings []string
	err := c.callManager(changeTimeout, "ReloadConfig").Store(&warnings)
	if err != nil {
		return reasons(err)
	}
	if c.json {
		if warnings == nil {
			warnings = []string{}
		}
		printJSON(c.stdout, map[string]any{"warnings": warnings})
		return nil
	}
	for _, w := range warnings {
		fmt.Fprintf(c.stderr, "poolctl: warning: %s\n", safetext.Line(w))
	}
	return nil
}

// reasons makes a refusal that lists reasons a line each, as the daemon
// wrote them, each escaped.
func reasons(err error) error {
	de, ok := dbusError(err)
	if !ok || len(de.Body) == 0 {
		return err
	}
	msg, _ := de.Body[0].(string)
	lines := strings.Split(strings.TrimRight(msg, "\n"), "\n")
	if len(lines) < 2 {
		return err
	}
	return multiLine{head: de.Name + ": " + lines[0], lines: lines[1:], err: err}
}
