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
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/godbus/dbus/v5"

	ifaces "github.com/llorch/pool-managerd/dbus"
	"github.com/llorch/pool-managerd/internal/safetext"
)

// Exit statuses, as systemctl's: 4 is "no such unit".
const (
	exitOK       = 0
	exitFailed   = 1 // a D-Bus error or another failure at run time
	exitUsage    = 2
	exitNoSuch   = 4
	exitStopped  = 130
	stopDeadline = 30 * time.Second
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// usageError is a mistake on the command line; cmd is the command whose
// help says more, "" for poolctl's.
type usageError struct{ cmd, msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, a ...any) error { return usageError{msg: fmt.Sprintf(format, a...)} }

// quietFailure ends a command with exit status 1 and nothing said (is-ready).
var quietFailure = errors.New("")

// command is one of poolctl's verbs.
type command struct {
	name, args, summary, help string
	// positional arguments it takes
	nargs int
	// opts are the command's own options (the global ones go everywhere)
	opts []string
	// fleet: takes several hosts (-H a,b)
	fleet  bool
	hidden bool
	run    func(c *cli, args []string) error
}

var commands = []command{
	{name: "list", summary: "list the pools, one line each", run: (*cli).list, fleet: true,
		help: "Columns: pool, state, ready, leases (active/slots, - for no limit), model, GPUs,\ncrashes, restarts, breaker, uptime of the engine's main process. With several hosts\n(-H a,b) a HOST column comes first."},
	{name: "status", args: "POOL", nargs: 1, summary: "show a pool's properties and its latest journal lines", run: (*cli).status,
		help: "Prints every property of the pool, then the last lines the daemon logged about it in this\nboot (its own entries with POOL_ID=POOL) and those of its engine's scope. --json prints the\nproperties only."},
	{name: "show", args: "POOL", nargs: 1, opts: []string{"property", "value"}, summary: "print a pool's properties as NAME=VALUE lines", run: (*cli).show,
		help: "-p NAME[,NAME] picks properties (the option may repeat); --value prints the values only."},
	{name: "logs", args: "POOL", nargs: 1, opts: []string{"follow", "lines"}, summary: "print the journal of the daemon about a pool and of its engine", run: (*cli).logs,
		help: "The daemon's own entries about POOL and those of its engine's scope, in this boot, merged\nby time. -n N prints the last N; -f follows until interrupted."},
	{name: "events", summary: "print every pool's state, then follow their changes until interrupted", run: (*cli).events,
		help: "First a line per pool with its state now, then one line per change: time, pool,\nproperty=value... --json prints JSON lines."},
	{name: "start", args: "POOL", nargs: 1, opts: []string{"no-block"}, summary: "start a pool and wait until it is ready", run: (*cli).start,
		help: "Waits, as systemctl start does, until the engine is Ready, and fails with the pool's\nLastError if it crashes or is held instead. A pool that is starting or ready is left as it\nis. On a terminal a line shows the step."},
	{name: "ensure-ready", args: "POOL", nargs: 1, opts: []string{"timeout"}, summary: "start an idle pool if need be and wait until it is ready", run: (*cli).ensureReady,
		help: "Calls EnsureReady, as a router does before it takes a lease: a ready pool answers at once;\nan idle, stopped or failed one is started (the circuit breaker permitting) and poolctl waits,\nsharing the start with the leases that wait for it. --timeout bounds the daemon's wait (at\nmost 1h; by default the pool's StartTimeoutSec=); past it the call fails with NotReady."},
	{name: "stop", args: "POOL", nargs: 1, opts: []string{"deadline", "now"}, summary: "stop a pool gracefully: drain it, then stop", run: (*cli).stop,
		help: "Refuses new leases, waits up to --deadline for those in flight, then stops the engine\n(leases still held are revoked). --now is --deadline 0."},
	{name: "restart", args: "POOL", nargs: 1, opts: []string{"deadline", "now", "no-block"}, summary: "stop a pool gracefully, then start it", run: (*cli).restart},
	{name: "drain", args: "POOL", nargs: 1, opts: []string{"deadline"}, summary: "stop new leases, wait for those in flight, stop the engine", run: (*cli).drain,
		help: "Waits until the drain is done and says whether it drained or was forced at the deadline.\nOn a terminal a line shows the leases released so far."},
	{name: "reload", args: "POOL MODEL", nargs: 2, opts: []string{"deadline", "runtime"}, summary: "swap a pool's model atomically (rolls back on failure)", run: (*cli).reload,
		help: "MODEL is a path beneath the models directory (or one a pool file names). --deadline bounds\nthe drain of the old engine's leases before the swap; leases still held then are revoked.\nThe new model persists; with --runtime it lasts until the next boot. On a terminal a line\nshows the step and its progress."},
	{name: "enable", args: "POOL", nargs: 1, opts: []string{"now", "runtime", "no-block"}, summary: "start a pool with the daemon (AutoStart=yes)", run: (*cli).enable,
		help: "Persists as a drop-in; with --runtime until the next boot. --now starts it too."},
	{name: "disable", args: "POOL", nargs: 1, opts: []string{"now", "runtime", "deadline"}, summary: "leave a pool stopped when the daemon starts (AutoStart=no)", run: (*cli).disable,
		help: "Persists as a drop-in; with --runtime until the next boot. --now stops it too (gracefully,\nwithin --deadline)."},
	{name: "is-ready", args: "POOL", nargs: 1, summary: "exit 0 if the pool is ready, 1 if not; print nothing", run: (*cli).isReady},
	{name: "wait", args: "POOL", nargs: 1, opts: []string{"for", "timeout"}, summary: "wait until a pool is in a state (ready unless --for says)", run: (*cli).wait,
		help: "Returns at once if the pool is there already. --timeout bounds the wait (none by default)."},
	{name: "reset-breaker", args: "POOL", nargs: 1, summary: "close a pool's circuit breakers", run: method("ResetBreaker")},
	{name: "allow-restart", args: "POOL", nargs: 1, summary: "let one held restart of a pool through", run: method("AllowRestart")},
	{name: "daemon-reload", summary: "make pool-managerd read its configuration again", run: (*cli).daemonReload,
		help: "Answers once the new configuration is applied; fails with the reasons, changing nothing,\nwhen it is refused. Warnings (a setting that needs a daemon restart) go to stderr."},
	{name: "__complete-models", args: "PREFIX", nargs: 1, opts: []string{"config-dir"}, hidden: true, run: (*cli).completeModels},
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
	tty     bool
	busAddr string
	// hosts from -H; host is the one connected to
	hosts []string
	host  string
	json  bool
	conn  *dbus.Conn
	// closeConn ends conn and what carries it (ssh)
	closeConn func()

	deadline  time.Duration
	now       bool
	noBlock   bool
	runtime   bool
	propNames []string
	valueOnly bool
	followLog bool
	lines     string
	waitFor   string
	timeout   time.Duration
	configDir string
}

func run(args []string, stdout, stderr io.Writer) int {
	c := &cli{stdout: stdout, stderr: stderr, tty: colourTerminal(stdout)}
	err := c.dispatch(args)
	c.disconnect()
	return report(stderr, err)
}

// report says what went wrong, if anything, and gives the exit status.
func report(stderr io.Writer, err error) int {
	var ue usageError
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, flag.ErrHelp):
		return exitOK
	case errors.Is(err, errInterrupted):
		return exitStopped
	case err == quietFailure:
		return exitFailed
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "poolctl: %s\nTry 'poolctl %s'.\n", safetext.Line(ue.msg), safetext.Line(strings.TrimSpace(ue.cmd+" --help")))
		return exitUsage
	}
	var lines multiLine
	if errors.As(err, &lines) {
		fmt.Fprintf(stderr, "poolctl: %s\n", safetext.Line(lines.head))
		for _, l := range lines.lines {
			fmt.Fprintf(stderr, "  %s\n", safetext.Line(l))
		}
	} else {
		fmt.Fprintf(stderr, "poolctl: %s\n", failure(err))
	}
	if errorName(err) == ifaces.ErrNoSuchPool {
		return exitNoSuch
	}
	return exitFailed
}

// multiLine is a failure whose reasons are a line each (a refused
// configuration names every bad file and line).
type multiLine struct {
	head  string
	lines []string
	err   error
}

func (m multiLine) Error() string { return m.head }
func (m multiLine) Unwrap() error { return m.err }

// flags is every option poolctl has; which a command takes is checked
// after parsing, so options may stand anywhere on the line.
func (c *cli) flagSet() *flag.FlagSet {
	fs := flag.NewFlagSet("poolctl", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&c.busAddr, "bus", "", "talk to the bus at `ADDRESS` instead of the system bus")
	fs.Func("H", "act on `[USER@]HOST[,...]` over ssh, as systemctl -H", c.addHosts)
	fs.Func("host", "act on `[USER@]HOST[,...]` over ssh, as systemctl -H", c.addHosts)
	fs.BoolVar(&c.json, "json", false, "print JSON")
	c.deadline = stopDeadline
	fs.Var(spanFlag{&c.deadline}, "deadline", "wait up to `SPAN` for leases in flight, then revoke them")
	fs.BoolVar(&c.now, "now", false, "stop: at once (--deadline 0); enable/disable: also start/stop")
	fs.BoolVar(&c.noBlock, "no-block", false, "ask and return at once, without waiting")
	fs.BoolVar(&c.runtime, "runtime", false, "the change lasts until the next boot")
	addProps := func(s string) error {
		for _, p := range strings.Split(s, ",") {
			if p = strings.TrimSpace(p); p != "" {
				c.propNames = append(c.propNames, p)
			}
		}
		return nil
	}
	fs.Func("p", "the properties `NAME[,NAME]` only", addProps)
	fs.Func("property", "the properties `NAME[,NAME]` only", addProps)
	fs.BoolVar(&c.valueOnly, "value", false, "print values only")
	fs.BoolVar(&c.followLog, "f", false, "follow the journal until interrupted")
	fs.BoolVar(&c.followLog, "follow", false, "follow the journal until interrupted")
	fs.StringVar(&c.lines, "n", "", "the last `N` entries (or all)")
	fs.StringVar(&c.lines, "lines", "", "the last `N` entries (or all)")
	fs.StringVar(&c.waitFor, "for", "ready", "the `STATE` to wait for")
	fs.Var(spanFlag{&c.timeout}, "timeout", "give up after `SPAN` (0: never)")
	fs.StringVar(&c.configDir, "config-dir", "/etc/pool-managerd", "")
	help := fs.Bool("help", false, "this help")
	fs.BoolVar(help, "h", false, "this help")
	return fs
}

// aliases are the short names of options, listed with the long ones in help.
var aliases = map[string]string{"H": "host", "p": "property", "f": "follow", "n": "lines", "h": "help"}

// global options apply to every command.
var global = []string{"bus", "H", "host", "json", "help", "h"}

func (c *cli) addHosts(s string) error {
	for _, h := range strings.Split(s, ",") {
		h = strings.TrimSpace(h)
		if err := checkHost(h); err != nil {
			return err
		}
		c.hosts = append(c.hosts, h)
	}
	return nil
}

func (c *cli) dispatch(args []string) error {
	cmd, pos, err := c.parse(args)
	if err != nil || cmd == nil {
		return err
	}
	return cmd.run(c, pos)
}

// parse reads the command line; a nil command with no error is help
// already printed.
func (c *cli) parse(args []string) (*command, []string, error) {
	fs := c.flagSet()
	pos, err := parseInterspersed(fs, args)
	if err != nil && !errors.Is(err, flag.ErrHelp) {
		cmd := ""
		if len(pos) > 0 && findCommand(pos[0]) != nil {
			cmd = pos[0]
		}
		return nil, nil, usageError{cmd, flagError(err)}
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	help := errors.Is(err, flag.ErrHelp) || set["help"] || set["h"]
	if len(pos) > 0 && pos[0] == "help" {
		help, pos = true, pos[1:]
	}
	if len(pos) == 0 {
		if help {
			c.usage(c.stdout)
			return nil, nil, nil
		}
		return nil, nil, usagef("no command given")
	}
	cmd := findCommand(pos[0])
	if cmd == nil {
		return nil, nil, usagef("unknown command %q", pos[0])
	}
	if help {
		c.commandUsage(cmd, c.stdout)
		return nil, nil, nil
	}
	pos = pos[1:]
	for name := range set {
		if !slices.Contains(global, name) && !slices.Contains(cmd.opts, name) && !slices.Contains(cmd.opts, aliases[name]) {
			return nil, nil, usageError{cmd.name, fmt.Sprintf("%s takes no option %s", cmd.name, dashes(name))}
		}
	}
	if len(pos) != cmd.nargs {
		want := "no arguments"
		if cmd.nargs > 0 {
			want = cmd.args
		}
		return nil, nil, usageError{cmd.name, fmt.Sprintf("%s takes %s, got %d argument(s)", cmd.name, want, len(pos))}
	}
	if c.now {
		if set["deadline"] && c.deadline != 0 {
			return nil, nil, usageError{cmd.name, fmt.Sprintf("%s: --now and --deadline %s contradict each other", cmd.name, span(c.deadline))}
		}
		if cmd.name == "stop" || cmd.name == "restart" {
			c.deadline = 0
		}
	}
	if set["lines"] || set["n"] {
		if err := checkLines(c.lines); err != nil {
			return nil, nil, usageError{cmd.name, fmt.Sprintf("%s: -n %s", cmd.name, err)}
		}
	}
	if cmd.name == "ensure-ready" && c.timeout > maxEnsureWait {
		return nil, nil, usageError{cmd.name, fmt.Sprintf("ensure-ready: --timeout %s is more than the daemon waits for a start (%s)", span(c.timeout), span(maxEnsureWait))}
	}
	if cmd.name == "wait" && !slices.Contains(poolStates, c.waitFor) {
		return nil, nil, usageError{cmd.name, fmt.Sprintf("wait: --for %q is no pool state (one of %s)", c.waitFor, strings.Join(poolStates, ", "))}
	}
	if c.busAddr != "" && len(c.hosts) > 0 {
		return nil, nil, usageError{cmd.name, "--bus and -H exclude each other"}
	}
	if len(c.hosts) > 1 && !cmd.fleet {
		return nil, nil, usageError{cmd.name, fmt.Sprintf("%s acts on one host; several hosts (-H %s) are for list", cmd.name, strings.Join(c.hosts, ","))}
	}
	if len(c.hosts) == 1 {
		c.host = c.hosts[0]
	}
	return cmd, pos, nil
}

// flagError words the flag package's errors as poolctl's own.
func flagError(err error) string {
	msg := err.Error()
	if m := badValue.FindStringSubmatch(msg); m != nil {
		return dashes(m[1]) + ": " + m[2]
	}
	if name, ok := strings.CutPrefix(msg, "flag provided but not defined: -"); ok {
		return "unknown option " + dashes(name)
	}
	if name, ok := strings.CutPrefix(msg, "flag needs an argument: -"); ok {
		return "option " + dashes(name) + " needs a value"
	}
	return msg
}

var badValue = regexp.MustCompile(`^invalid value ".*" for flag -(\S+): (.*)$`)

// poolStates are the states a pool may be in (wait --for).
var poolStates = []string{"stopped", "starting", "warming", "ready", "draining", "backoff", "failed", "idle", "sleeping", "waking"}

func dashes(name string) string {
	if len(name) == 1 {
		return "-" + name
	}
	return "--" + name
}

// checkLines accepts what journalctl -n does: a count or "all".
func checkLines(s string) error {
	if s == "all" {
		return nil
	}
	if s == "" || len(s) > 9 || strings.Trim(s, "0123456789") != "" {
		return fmt.Errorf("%q is no number of lines (a count, or all)", s)
	}
	return nil
}

// parseInterspersed lets options stand anywhere, as in "poolctl drain
// llama8b --deadline 10s" and "poolctl --json list"; after "--" all are
// arguments.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return pos, err
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
	fmt.Fprint(w, "Usage: poolctl [OPTIONS] COMMAND [ARGS]\n\n"+
		"Drive pool-managerd over D-Bus (org.llorch.PoolManager1 on the system bus).\n\nCommands:\n")
	for _, cmd := range commands {
		if !cmd.hidden {
			fmt.Fprintf(w, "  %-26s %s\n", strings.TrimSpace(cmd.name+" "+cmd.args), cmd.summary)
		}
	}
	fmt.Fprint(w, "\nOptions (anywhere on the line):\n"+
		"  --json                     print JSON (indented; events: a line per event)\n"+
		"  -H, --host [USER@]HOST[,...]  act on other hosts over ssh, as systemctl -H\n"+
		"  --bus ADDRESS              a D-Bus address instead of the system bus\n"+
		"  -h, --help                 this help; 'poolctl COMMAND --help' for a command's\n\n"+
		"Time spans are systemd's: 30s, 5min, 1h 30min, 500ms; a bare number is seconds.\n"+
		"Exit status: 0 on success, 1 on a failure (the D-Bus error name is printed), 2 on a usage\n"+
		"error, 4 for a pool the daemon does not have. See poolctl(1).\n")
}

func (c *cli) commandUsage(cmd *command, w io.Writer) {
	fmt.Fprintf(w, "Usage: poolctl %s\n\n%s.\n", strings.TrimSpace(cmd.name+" "+cmd.args+" [OPTIONS]"), upperFirst(cmd.summary))
	if cmd.help != "" {
		fmt.Fprintf(w, "\n%s\n", cmd.help)
	}
	fmt.Fprintf(w, "\nOptions:\n")
	fs := (&cli{}).flagSet()
	short := map[string]string{}
	for s, l := range aliases {
		short[l] = s
	}
	for _, name := range append(slices.Clone(cmd.opts), "json", "host", "bus", "help") {
		f := fs.Lookup(name)
		arg, usage := flag.UnquoteUsage(f)
		if _, ok := f.Value.(interface{ IsBoolFlag() bool }); ok {
			arg = ""
		}
		names := "--" + name
		if s, ok := short[name]; ok {
			names = "-" + s + ", " + names
		}
		fmt.Fprintf(w, "  %-28s %s", strings.TrimSpace(names+" "+arg), usage)
		if f.DefValue != "" && f.DefValue != "false" && f.DefValue != "0s" {
			fmt.Fprintf(w, " (default %s)", f.DefValue)
		}
		fmt.Fprintln(w)
	}
}

func upperFirst(s string) string {
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}
