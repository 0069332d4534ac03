// Command poolctl is the operator's client of pool-managerd. It speaks only
// the daemon's D-Bus API, so anything it does busctl can do too; reads work
// for every user, changes are for root and the admin group.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/godbus/dbus/v5"

	"github.com/llorch/pool-managerd/internal/safetext"
)

// Exit statuses.
const (
	exitOK      = 0
	exitFailed  = 1 // a D-Bus error or another failure at run time
	exitUsage   = 2
	exitStopped = 130
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// usageError is a mistake on the command line; cmd is the command whose
// help says more, "" for poolctl's.
type usageError struct{ cmd, msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, a ...any) error { return usageError{msg: fmt.Sprintf(format, a...)} }

// command is one of poolctl's verbs.
type command struct {
	name, args, summary, help string
	// positional arguments it takes
	nargs int
	json  bool // takes --json
	// deadline: takes --deadline
	deadline bool
	noBlock  bool // takes --no-block
	run      func(c *cli, args []string) error
}

var commands = []command{
	{name: "list", summary: "list the pools, one line each", json: true, run: (*cli).list,
		help: "Columns: pool, state, ready, leases (active/slots, - for no limit), model, GPUs,\ncrashes, restarts, breaker, uptime of the engine's main process."},
	{name: "status", args: "POOL", nargs: 1, summary: "show a pool's properties and its latest journal lines", json: true, run: (*cli).status,
		help: "Prints every property of the pool, then the last lines the daemon logged about it in this\nboot (its own entries with POOL_ID=POOL) and those of its engine's scope. --json prints the\nproperties only."},
	{name: "start", args: "POOL", nargs: 1, noBlock: true, summary: "start a stopped pool and wait until it is ready", run: (*cli).start,
		help: "Waits, as systemctl start does, until the engine is Ready, and fails with the pool's\nLastError if it crashes or is held instead. On a terminal a line shows the step."},
	{name: "stop", args: "POOL", nargs: 1, summary: "stop a pool (a drain with deadline 0)", run: method("Stop")},
	{name: "drain", args: "POOL", nargs: 1, deadline: true, summary: "stop new leases, wait for those in flight, stop the engine", run: (*cli).drain,
		help: "Waits until the drain is done and says whether it drained or was forced at the deadline.\nOn a terminal a line shows the leases released so far."},
	{name: "reload", args: "POOL MODEL", nargs: 2, deadline: true, summary: "swap a pool's model atomically (rolls back on failure)", run: (*cli).reload,
		help: "MODEL is a path beneath the models directory (or one a pool file names). The deadline\nbounds the drain before the swap. On a terminal a line shows the step and its progress."},
	{name: "reset-breaker", args: "POOL", nargs: 1, summary: "close a pool's circuit breakers", run: method("ResetBreaker")},
	{name: "allow-restart", args: "POOL", nargs: 1, summary: "let one held restart of a pool through", run: method("AllowRestart")},
	{name: "events", summary: "follow every pool's property changes until interrupted", json: true, run: (*cli).events,
		help: "One line per change: time, pool, property=value... --json prints JSON lines."},
}

func findCommand(name string) *command {
	for i := range commands {
		if commands[i].name == name {
			return &commands[i]
		}
	}
	return nil
}

// cli is one invocation.
type cli struct {
	stdout, stderr io.Writer
	// tty: stdout is a terminal (colour, live progress lines)
	tty      bool
	busAddr  string
	json     bool
	deadline time.Duration
	noBlock  bool
	conn     *dbus.Conn
}

func run(args []string, stdout, stderr io.Writer) int {
	c := &cli{stdout: stdout, stderr: stderr, tty: colourTerminal(stdout)}
	err := c.dispatch(args)
	if c.conn != nil {
		c.conn.Close()
	}
	var ue usageError
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, flag.ErrHelp):
		return exitOK
	case errors.Is(err, errInterrupted):
		return exitStopped
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "poolctl: %s\nTry 'poolctl %s'.\n", safetext.Line(ue.msg), safetext.Line(strings.TrimSpace(ue.cmd+" --help")))
		return exitUsage
	}
	fmt.Fprintf(stderr, "poolctl: %s\n", failure(err))
	return exitFailed
}

func (c *cli) dispatch(args []string) error {
	global := flag.NewFlagSet("poolctl", flag.ContinueOnError)
	global.SetOutput(io.Discard)
	global.StringVar(&c.busAddr, "bus", "", "")
	help := global.Bool("help", false, "")
	global.BoolVar(help, "h", false, "")
	if err := global.Parse(args); err != nil {
		return usagef("%v", err)
	}
	if *help || (global.NArg() > 0 && global.Arg(0) == "help" && global.NArg() == 1) {
		c.usage(c.stdout)
		return nil
	}
	if global.NArg() == 0 {
		return usagef("no command given")
	}
	name := global.Arg(0)
	if name == "help" {
		name = global.Arg(1)
		args = []string{"--help"}
	} else {
		args = global.Args()[1:]
	}
	cmd := findCommand(name)
	if cmd == nil {
		return usagef("unknown command %q", name)
	}
	fs := c.flags(cmd)
	pos, err := parseInterspersed(fs, args)
	if errors.Is(err, flag.ErrHelp) {
		c.commandUsage(cmd, fs, c.stdout)
		return err
	}
	if err != nil {
		return usageError{cmd.name, fmt.Sprintf("%s: %v", cmd.name, err)}
	}
	if len(pos) != cmd.nargs {
		want := "no arguments"
		if cmd.nargs > 0 {
			want = cmd.args
		}
		return usageError{cmd.name, fmt.Sprintf("%s takes %s, got %d argument(s)", cmd.name, want, len(pos))}
	}
	if c.deadline < 0 {
		return usageError{cmd.name, fmt.Sprintf("%s: --deadline %s is negative", cmd.name, c.deadline)}
	}
	return cmd.run(c, pos)
}

func (c *cli) flags(cmd *command) *flag.FlagSet {
	fs := flag.NewFlagSet(cmd.name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&c.busAddr, "bus", c.busAddr, "bus `ADDRESS` (default: the system bus)")
	if cmd.json {
		fs.BoolVar(&c.json, "json", false, "print JSON")
	}
	if cmd.noBlock {
		fs.BoolVar(&c.noBlock, "no-block", false, "ask and return at once, without waiting")
	}
	if cmd.deadline {
		fs.DurationVar(&c.deadline, "deadline", 30*time.Second, "wait up to `DURATION` for leases in flight, then revoke them")
	}
	return fs
}

// parseInterspersed lets flags follow the arguments, as in
// "poolctl drain llama8b --deadline 10s"; after "--" all are arguments.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return pos, nil
		}
		if n := len(args) - len(rest); n > 0 && args[n-1] == "--" {
			return append(pos, rest...), nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

func (c *cli) usage(w io.Writer) {
	fmt.Fprint(w, "Usage: poolctl [--bus ADDRESS] COMMAND [ARGS] [--json] [--deadline DURATION] [--no-block]\n\n"+
		"Drive pool-managerd over D-Bus (org.llorch.PoolManager1 on the system bus).\n\nCommands:\n")
	for _, cmd := range commands {
		fmt.Fprintf(w, "  %-26s %s\n", strings.TrimSpace(cmd.name+" "+cmd.args), cmd.summary)
	}
	fmt.Fprint(w, "\nOptions:\n  --bus ADDRESS              a D-Bus address instead of the system bus\n"+
		"  -h, --help                 this help; 'poolctl COMMAND --help' for a command's\n\n"+
		"Exit status: 0 on success, 1 on a failure (the D-Bus error name is printed), 2 on a usage error.\n"+
		"See poolctl(1).\n")
}

func (c *cli) commandUsage(cmd *command, fs *flag.FlagSet, w io.Writer) {
	fmt.Fprintf(w, "Usage: poolctl %s\n\n%s.\n", strings.TrimSpace(cmd.name+" "+cmd.args+" [OPTIONS]"), upperFirst(cmd.summary))
	if cmd.help != "" {
		fmt.Fprintf(w, "\n%s\n", cmd.help)
	}
	fmt.Fprintf(w, "\nOptions:\n")
	fs.VisitAll(func(f *flag.Flag) {
		name, usage := flag.UnquoteUsage(f)
		fmt.Fprintf(w, "  --%-24s %s", strings.TrimSpace(f.Name+" "+name), usage)
		if f.DefValue != "" && f.DefValue != "false" {
			fmt.Fprintf(w, " (default %s)", f.DefValue)
		}
		fmt.Fprintln(w)
	})
}

func upperFirst(s string) string {
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}
