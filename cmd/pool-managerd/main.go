// Command pool-managerd supervises GPU inference engines as pools.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/crash"
	"github.com/llorch/pool-managerd/internal/shim"
)

// Exit statuses, as sysexits.h and systemd name them.
const (
	exitOK     = 0
	exitUsage  = 2
	exitConfig = 78 // EX_CONFIG
)

func main() {
	// Without pool-managerd-shim installed, the daemon re-executes itself
	// as the shim that starts each engine inside its scope.
	if shim.Is() {
		os.Exit(shim.Main())
	}
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("pool-managerd", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dir := fs.String("config-dir", config.DefaultDir, "configuration directory (pool-managerd.conf and pools.d/*.pool)")
	check := fs.Bool("check-config", false, "validate the configuration and what its pools need of this host (GPUs, users, engines, models), print the resolved pools and what the host lacks, and exit (78 on errors)")
	schedule := fs.Int("print-schedule", 0, "print the restart schedule the policy follows for `N` consecutive crashes of each pool, and exit")
	reason := fs.String("crash-reason", string(crash.ExitCode), "crash reason for --print-schedule")
	crashAfter := fs.Duration("crash-after", 0, "how long each restarted engine runs before it crashes again, for --print-schedule")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "pool-managerd: unexpected argument %q\n", fs.Arg(0))
		return exitUsage
	}
	r, err := crash.ParseReason(*reason)
	if err != nil {
		fmt.Fprintf(stderr, "pool-managerd: --crash-reason: %v\n", err)
		return exitUsage
	}

	cfg, err := config.Load(*dir)
	if err != nil {
		var errs config.Errors
		if errors.As(err, &errs) {
			fmt.Fprintf(stderr, "%s: %d configuration error(s):\n", *dir, len(errs))
		}
		fmt.Fprintln(stderr, err)
		return exitConfig
	}
	if *check {
		printConfig(stdout, cfg)
		printHostWarnings(stderr, cfg)
		if errs := hostErrors(cfg); len(errs) > 0 {
			fmt.Fprintf(stderr, "%s: %d error(s) the pools would meet on this host:\n%s\n", *dir, len(errs), errs)
			return exitConfig
		}
	}
	if *schedule > 0 {
		for _, p := range cfg.Pools {
			if err := printSchedule(stdout, p, r, *schedule, *crashAfter, time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)); err != nil {
				fmt.Fprintf(stderr, "pool %s: %v\n", p.ID, err)
				return exitUsage
			}
		}
	}
	if *check || *schedule > 0 {
		return exitOK
	}
	return daemon(*dir, cfg, stderr)
}
