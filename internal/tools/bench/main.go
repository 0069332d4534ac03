// Command bench measures pool-managerd against systemd, the bus and the
// engine alone in the same run, inside the project's sandbox. Every figure
// is taken in interleaved rounds (ours, then its reference, then ours
// again, ...), so that a goal is judged on the median of rounds and not on
// one run's luck; build/bench.json holds every round. Run it with make
// bench; BENCH_ARGS names figures to run alone (see usage).
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
	"github.com/llorch/pool-managerd/internal/tools/load"
)

// figureNames are what BENCH_ARGS may select, in the order they run.
var figureNames = []string{"crash", "restart", "lease", "drain", "reload", "staging", "ready", "scale", "storm", "ondemand"}

const usage = `usage: bench [FIGURE...] [rounds=N] [stage-mb=N] [idle-sec=N] [load=N] [profile=DIR]
figures: crash restart lease drain reload staging ready scale storm ondemand (default: all)
  rounds=N    rounds per figure (default 5, at least 1)
  stage-mb=N  size of the staging figure's model file (default 2048)
  idle-sec=N  length of each round's 64-pool idle CPU windows (default 10)
  load=N      N CPU-bound processes in the engines' slice for every round (default 0)
  profile=DIR the daemon's execution trace, block and mutex profiles, and
              CPU profiles of the idle windows and storms, in DIR (the
              daemon built with GOFLAGS=-tags=pprof)`

// Options are the parsed arguments.
type Options struct {
	Figures []string `json:"figures"`
	Rounds  int      `json:"rounds"`
	StageMB int      `json:"stage_mb"`
	IdleSec int      `json:"idle_sec"`
	Load    int      `json:"load"`
	Profile string   `json:"profile,omitempty"`
	all     bool
}

func (o Options) has(names ...string) bool {
	for _, n := range names {
		if slices.Contains(o.Figures, n) {
			return true
		}
	}
	return false
}

func parseArgs(args []string) (Options, error) {
	o := Options{Rounds: 5, StageMB: 2048, IdleSec: 10}
	for _, a := range args {
		k, v, kv := strings.Cut(a, "=")
		if !kv {
			switch {
			case a == "scale":
				o.Figures = append(o.Figures, "scale", "storm")
			case slices.Contains(figureNames, a):
				o.Figures = append(o.Figures, a)
			default:
				return o, fmt.Errorf("unknown figure %q\n%s", a, usage)
			}
			continue
		}
		if k == "load" {
			n, err := load.Parse(v)
			if err != nil {
				return o, fmt.Errorf("%v\n%s", err, usage)
			}
			o.Load = n
			continue
		}
		if k == "profile" {
			if !filepath.IsAbs(v) {
				return o, fmt.Errorf("profile: want an absolute directory, got %q\n%s", v, usage)
			}
			o.Profile = filepath.Clean(v)
			continue
		}
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return o, fmt.Errorf("%s: want a positive whole number, got %q\n%s", k, v, usage)
		}
		switch k {
		case "rounds":
			o.Rounds = n
		case "stage-mb":
			o.StageMB = n
		case "idle-sec":
			o.IdleSec = n
		default:
			return o, fmt.Errorf("unknown setting %q\n%s", k, usage)
		}
	}
	if len(o.Figures) == 0 {
		o.Figures, o.all = figureNames, true
	}
	slices.SortFunc(o.Figures, func(a, b string) int { return slices.Index(figureNames, a) - slices.Index(figureNames, b) })
	o.Figures = slices.Compact(o.Figures)
	return o, nil
}

// Report is what the run writes to build/bench.json.
type Report struct {
	Options Options   `json:"options"`
	Start   string    `json:"start"`
	Seconds float64   `json:"seconds"`
	Host    load.Host `json:"host"`
	Figures []Figure  `json:"figures"`
}

func must(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		panic(err)
	}
}

var began = time.Now()

// progress tells the person waiting what runs now (stdout carries the
// figures).
func progress(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "bench %5.1fs: %s\n", time.Since(began).Seconds(), fmt.Sprintf(format, a...))
}

func main() {
	opts, err := parseArgs(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(2)
	}
	if sandbox.Inside() {
		defer func() {
			if r := recover(); r != nil {
				fmt.Fprintln(os.Stderr, "bench inside:", r)
				os.Exit(1)
			}
		}()
		inside(opts)
		return
	}
	// Outside: boot a sandbox and run this program again inside it.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	var buf bytes.Buffer
	so := sandbox.Options{Nodes: sandbox.GPUNodes(scalePools), Prepare: [][]string{{"useradd", "--system", "pool-engine"}}}
	if opts.Profile != "" {
		must(os.MkdirAll(opts.Profile, 0o700))
		so.Binds = append(so.Binds, opts.Profile)
	}
	must(sandbox.RunSelf(ctx, so,
		&buf, "github.com/llorch/pool-managerd/cmd/pool-managerd", "github.com/llorch/pool-managerd/cmd/pool-managerd-shim", "github.com/llorch/pool-managerd/cmd/pool-engine-sim"))
	out := buf.Bytes()
	if len(out) == 0 {
		must(fmt.Errorf("the measurement inside the sandbox printed nothing"))
	}
	var rep Report
	if err := json.Unmarshal(out, &rep); err != nil {
		must(fmt.Errorf("reading the figures: %v: %q", err, out))
	}
	must(os.MkdirAll("build", 0o755))
	name := "build/bench.json"
	if !opts.all {
		// Named as asked: BENCH_ARGS=scale writes build/bench-scale.json.
		var words []string
		for _, a := range os.Args[1:] {
			if !strings.Contains(a, "=") {
				words = append(words, a)
			}
		}
		name = "build/bench-" + strings.Join(words, "-") + ".json"
	}
	if opts.Load > 0 {
		name = strings.TrimSuffix(name, ".json") + fmt.Sprintf("-load%d.json", opts.Load)
	}
	must(os.WriteFile(name, out, 0o644))
	printTable(os.Stdout, rep)
	fmt.Printf("\n%d rounds per figure, %.0f s; every round in %s\n", rep.Options.Rounds, rep.Seconds, name)
}
