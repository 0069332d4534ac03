package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/godbus/dbus/v5"
	"golang.org/x/sys/unix"

	ifaces "github.com/llorch/pool-managerd/dbus"
	"github.com/llorch/pool-managerd/internal/safetext"
)

// method is a command that calls a Manager method on one pool and prints
// nothing on success, as systemctl start does.
func method(name string) func(*cli, []string) error {
	return func(c *cli, args []string) error {
		return c.callManager(changeTimeout, name, args[0]).Err
	}
}

// start asks for a pool's start and, as systemctl start waits for its
// job, waits until the engine serves: Ready, or a failure that names why.
// A pool that is starting or ready already is left as it is.
func (c *cli) start(args []string) error {
	return c.startPool("start", args[0])
}

func (c *cli) startPool(verb, id string) error {
	if c.noBlock {
		return c.callManager(changeTimeout, "Start", id).Err
	}
	call := func(ctx context.Context, obj dbus.BusObject) (string, error) {
		return "ready", obj.CallWithContext(ctx, managerIface+".Start", 0, id).Err
	}
	return c.followUntil(verb, id, call, startSettled)
}

// startSettled says when a start is over: ready, or a state the engine
// only reaches by failing (or by being stopped meanwhile).
func startSettled(p progressLine) (bool, error) {
	switch p.state {
	case "ready":
		return true, nil
	case "backoff", "failed", "stopped":
		why := p.lastErr
		if why == "" {
			why = "no error recorded"
		}
		return true, fmt.Errorf("the engine did not come up: pool %s is %s: %s", p.pool, p.state, why)
	}
	return false, nil
}

// stop stops a pool gracefully: a drain within the deadline, then Stop,
// which the daemon keeps as the operator's word across its own restart.
// --now is Stop alone (a drain with deadline 0).
func (c *cli) stop(args []string) error {
	return c.stopPool("stop", args[0])
}

func (c *cli) stopPool(verb, id string) error {
	return c.follow(verb, id, func(ctx context.Context, obj dbus.BusObject) (string, error) {
		outcome := "stopped"
		if c.deadline > 0 {
			if err := obj.CallWithContext(ctx, managerIface+".Drain", 0, id, uint64(c.deadline.Milliseconds())).Store(&outcome); err != nil {
				return "", err
			}
		}
		return outcome, obj.CallWithContext(ctx, managerIface+".Stop", 0, id).Err
	})
}

// restart is stop, then start.
func (c *cli) restart(args []string) error {
	if err := c.stopPool("restart", args[0]); err != nil {
		return err
	}
	return c.startPool("restart", args[0])
}

func (c *cli) drain(args []string) error {
	id := args[0]
	return c.follow("drain", id, func(ctx context.Context, obj dbus.BusObject) (string, error) {
		var outcome string
		err := obj.CallWithContext(ctx, managerIface+".Drain", 0, id, uint64(c.deadline.Milliseconds())).Store(&outcome)
		return outcome, err
	})
}

// reloadCall is the method and arguments of a reload: ReloadEx only where
// an option needs it, so a plain reload works with every daemon.
func reloadCall(id, ref string, deadline time.Duration, runtime bool) (string, []any) {
	ms := uint64(deadline.Milliseconds())
	if !runtime {
		return "Reload", []any{id, ref, ms}
	}
	return "ReloadEx", []any{id, ref, ms, map[string]dbus.Variant{"runtime": dbus.MakeVariant(true)}}
}

func (c *cli) reload(args []string) error {
	id, ref := args[0], args[1]
	name, in := reloadCall(id, ref, c.deadline, c.runtime)
	return c.follow("reload", id, func(ctx context.Context, obj dbus.BusObject) (string, error) {
		var model string
		err := obj.CallWithContext(ctx, managerIface+"."+name, 0, in...).Store(&model)
		if err != nil {
			return "", err
		}
		return "reloaded " + model, nil
	})
}

// autoStartCall is the method and arguments of enable and disable.
func autoStartCall(enable bool, id string, runtime bool) (string, []any) {
	if enable {
		return "Enable", []any{id, runtime}
	}
	return "Disable", []any{id, runtime}
}

// enable sets AutoStart=yes; --now starts the pool too, as systemctl
// enable --now does.
func (c *cli) enable(args []string) error {
	name, in := autoStartCall(true, args[0], c.runtime)
	if err := c.callManager(readTimeout, name, in...).Err; err != nil {
		return err
	}
	if c.now {
		return c.startPool("start", args[0])
	}
	return nil
}

// disable sets AutoStart=no; --now stops the pool too, gracefully.
func (c *cli) disable(args []string) error {
	name, in := autoStartCall(false, args[0], c.runtime)
	if err := c.callManager(readTimeout, name, in...).Err; err != nil {
		return err
	}
	if c.now {
		return c.stopPool("stop", args[0])
	}
	return nil
}

// follow runs a long call (drain, reload) while showing the pool's
// Operation and Progress: one line rewritten in place on a terminal, a
// line per step otherwise; then a line with the outcome and how long it
// took.
func (c *cli) follow(verb, id string, call func(context.Context, dbus.BusObject) (string, error)) error {
	return c.followUntil(verb, id, call, nil)
}

// followUntil is follow that, once the call has succeeded, goes on
// following the pool until settled says the command is done.
func (c *cli) followUntil(verb, id string, call func(context.Context, dbus.BusObject) (string, error), settled func(progressLine) (bool, error)) error {
	conn, err := c.bus()
	if err != nil {
		return err
	}
	sigs, own, err := c.watch(ifaces.PoolPath(id))
	if err != nil {
		return err
	}
	// A daemon not on the bus when the command began did not leave it: it
	// is not running.
	wasUp := own.get() != ""
	// The daemon answers when it is done: past the deadline it still
	// stops one engine and starts another.
	ctx, cancel := context.WithTimeout(context.Background(), c.deadline+changeTimeout)
	defer cancel()
	type result struct {
		outcome string
		err     error
	}
	done := make(chan result, 1)
	begin := time.Now()
	obj := conn.Object(busName, managerPath)
	go func() {
		o, err := call(ctx, obj)
		done <- result{o, err}
	}()
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(stop)
	// live: one line redrawn in place; never under --json.
	live := c.tty && !c.json
	var tick <-chan time.Time
	if live {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		tick = t.C
	}

	p := progressLine{verb: verb, pool: id, progress: -1}
	draw := func() {
		if live {
			fmt.Fprint(c.stdout, "\r\x1b[K"+fit(p.String(time.Since(begin)), c.width()))
		}
	}
	clear := func() {
		if live {
			fmt.Fprint(c.stdout, "\r\x1b[K")
		}
	}
	outcome := ""
	// finish ends the command once the call and, if any, the wait are over.
	finish := func(err error) error {
		clear()
		took := time.Since(begin).Round(100 * time.Millisecond)
		if c.json {
			if err == nil {
				printJSON(c.stdout, map[string]any{"pool": id, "command": verb, "outcome": outcome, "seconds": took.Seconds()})
			}
			return err
		}
		if err != nil {
			fmt.Fprintf(c.stdout, "%s %s: failed after %s\n", verb, safetext.Line(id), took)
			return err
		}
		fmt.Fprintf(c.stdout, "%s %s: %s in %s\n", verb, safetext.Line(id), safetext.Line(outcome), took)
		return nil
	}
	// show redraws the line on a terminal, or prints a new step.
	show := func(stepped bool) {
		if live {
			draw()
		} else if stepped && p.op != "" && !c.json {
			fmt.Fprintf(c.stdout, "%s %s: %s\n", verb, safetext.Line(id), safetext.Line(p.op))
		}
	}
	waiting := false
	// reread takes the pool's properties as they are now and says whether
	// the wait is over.
	leftBus := fmt.Errorf("pool-managerd left the bus during the %s of %s (poolctl status %s)", verb, id, id)
	// gone says whether err is the daemon's leaving the bus.
	gone := func(err error) bool {
		var de dbus.Error
		if !errors.As(err, &de) {
			return false
		}
		switch de.Name {
		case "org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner":
			return true
		case "org.freedesktop.DBus.Error.NoReply":
			var owner string
			return conn.BusObject().Call(busDriver+".GetNameOwner", 0, busName).Store(&owner) != nil
		}
		return false
	}
	reread := func() (bool, error) {
		m, err := c.props(id)
		if gone(err) {
			return true, leftBus
		}
		if err != nil {
			return true, err
		}
		show(p.apply(m))
		return settled(p)
	}
	draw()
	for {
		select {
		case r := <-done:
			if gone(r.err) && wasUp {
				return finish(leftBus)
			}
			if r.err != nil || settled == nil {
				outcome = r.outcome
				return finish(r.err)
			}
			outcome, waiting = r.outcome, true
			// The pool may have got where the wait ends before the
			// answer was read.
			if ok, err := reread(); ok {
				return finish(err)
			}
		case s := <-sigs:
			switch ch := classify(s, own).(type) {
			case ownerChange:
				if !waiting {
					continue // the call's own answer will say
				}
				if ch.new == "" {
					return finish(leftBus)
				}
				// A daemon back on the bus adopts the engine as it is.
				if ok, err := reread(); ok {
					return finish(err)
				}
			case change:
				if ch.Pool != id {
					continue
				}
				show(p.apply(ch.Changed))
				if !waiting {
					continue
				}
				if ok, err := settled(p); ok {
					if err == nil {
						return finish(nil)
					}
					// A signal may be older than the answer (a crash
					// just before the start): the pool's state now
					// decides.
					if ok, err := reread(); ok {
						return finish(err)
					}
				}
			}
		case <-ctx.Done():
			return finish(fmt.Errorf("%s of %s: no end after %s (poolctl status %s)", verb, id, c.deadline+changeTimeout, id))
		case <-tick:
			draw()
		case <-stop:
			clear()
			fmt.Fprintf(c.stderr, "poolctl: interrupted: the %s of %s goes on in pool-managerd (poolctl status %s)\n", verb, safetext.Line(id), safetext.Line(id))
			return errInterrupted
		}
	}
}

// progressLine is what a long call shows.
type progressLine struct {
	verb, pool, op string
	progress       float64
	// the pool's State and LastError, for a wait on the state
	state, lastErr string
}

// apply takes a change in; it reports whether the step changed.
func (p *progressLine) apply(changed map[string]dbus.Variant) bool {
	stepped := false
	if v, ok := changed["Operation"]; ok {
		op, _ := v.Value().(string)
		stepped = op != p.op
		p.op = op
		if stepped {
			p.progress = -1
		}
	}
	if v, ok := changed["Progress"]; ok {
		if f, ok := v.Value().(float64); ok {
			p.progress = f
		}
	}
	if v, ok := changed["State"]; ok {
		p.state, _ = v.Value().(string)
	}
	if v, ok := changed["LastError"]; ok {
		p.lastErr, _ = v.Value().(string)
	}
	return stepped
}

// String is the line a terminal shows, escaped: the operation's name comes
// from the daemon, and a newline in it would break the redrawing.
func (p progressLine) String(elapsed time.Duration) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s: ", p.verb, p.pool)
	if p.op == "" {
		b.WriteString("waiting")
	} else {
		b.WriteString(p.op)
	}
	if p.op != "" && p.progress >= 0 && p.progress <= 1 {
		b.WriteString(" " + percent(p.progress))
	}
	fmt.Fprintf(&b, " (%s)", span(elapsed.Truncate(time.Second)))
	return safetext.Line(b.String())
}

// width is the terminal's width, 0 when not known.
func (c *cli) width() int {
	f, ok := c.stdout.(*os.File)
	if !ok {
		return 0
	}
	ws, err := unix.IoctlGetWinsize(int(f.Fd()), unix.TIOCGWINSZ)
	if err != nil {
		return 0
	}
	return int(ws.Col)
}

// fit cuts s to the terminal's width, so that a carriage return still
// goes back to its start.
func fit(s string, width int) string {
	if width <= 1 {
		return s
	}
	r := []rune(s)
	if len(r) < width {
		return s
	}
	return string(r[:width-1])
}
