package main

import (
	"cmp"
	"fmt"
	"io"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/crash"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/policy"
	"github.com/llorch/pool-managerd/internal/users"
)

func printConfig(w io.Writer, c *config.Config) {
	m := c.Manager
	fmt.Fprintf(w, "manager: %s\n", cmp.Or(m.File, "(defaults)"))
	fmt.Fprintf(w, "  state %s, runtime %s, cache %s, models %s\n", m.StateDir, m.RuntimeDir, m.CacheDir, m.ModelsDir)
	fmt.Fprintf(w, "  metrics %s every %s, listen %s, admin group %s\n", cmp.Or(m.MetricsTextfile, "(off)"), m.MetricsInterval, cmp.Or(m.MetricsListen, "(off)"), m.AdminGroup)
	fmt.Fprintf(w, "  engines' own users: uids %d-%d\n", m.EngineUIDs.First, m.EngineUIDs.Last)
	fmt.Fprintf(w, "  inventory %s", m.Inventory.Backend)
	for _, d := range m.Inventory.Devices {
		fmt.Fprintf(w, ", %d=%s (%s)", d.Index, d.UUID, d.Node)
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "%d pool(s)\n", len(c.Pools))
	for _, p := range c.Pools {
		printPool(w, p, m.ModelsDir)
	}
}

func printPool(w io.Writer, p *config.Pool, modelsDir string) {
	model := p.Model
	if !filepath.IsAbs(strings.TrimPrefix(model, "file://")) {
		model = filepath.Join(modelsDir, model)
	}
	sp := p.Specifiers(strings.TrimPrefix(model, "file://"))
	exec := make([]string, len(p.Engine.ExecStart))
	for i, a := range p.Engine.ExecStart {
		exec[i] = sp.Expand(a)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 1, ' ', 0)
	fmt.Fprintf(tw, "\npool %s\t(%s)\n", p.ID, p.File)
	row := func(k, format string, a ...any) { fmt.Fprintf(tw, "  %s\t"+format+"\n", append([]any{k}, a...)...) }
	// Like systemctl cat: what was read after the pool file, in order.
	for _, d := range p.DropIns {
		row("drop-in", "%s", d)
	}
	if p.Description != "" {
		row("description", "%s", p.Description)
	}
	row("unit", "pool-engine-%s.scope in pool-managerd-engines.slice", p.ID)
	row("devices", "%s", sp.Devices)
	row("model", "%s%s", model, prefix(" ", p.ModelDigest))
	if p.Slots > 0 {
		row("slots", "%d", p.Slots)
	} else {
		row("slots", "unlimited")
	}
	row("autostart", "%t", p.AutoStart)
	row("exec", "%s", strings.Join(exec, " "))
	if p.Engine.User != "" {
		row("user", "%s (shared on purpose with the pools that name it)", p.Engine.User)
	} else {
		row("user", "its own (%s%s, a uid of EngineUIDs=, group %s besides)", users.NamePrefix, p.ID, config.EngineGroup)
	}
	if p.Engine.DeviceIDs == config.DeviceIDsIndex {
		row("device ids", "NVML indices, CUDA_DEVICE_ORDER=PCI_BUS_ID")
	}
	for _, e := range p.Engine.Environment {
		row("environment", "%s", sp.Expand(e))
	}
	row("stop", "SIGTERM, SIGKILL after %s", p.Engine.StopTimeout)
	if p.Engine.Version != "" {
		row("version", "%s", p.Engine.Version)
	} else if len(p.Engine.VersionCommand) > 0 {
		row("version", "from %s", strings.Join(p.Engine.VersionCommand, " "))
	}
	h := p.Health
	row("health", "%s every %s, timeout %s, unhealthy after %d failures, start timeout %s", sp.Expand(p.Engine.HealthURL), h.Interval, h.Timeout, h.FailureThreshold, h.StartTimeout)
	if h.Stall > 0 {
		row("stall", "%s in flight with no token for %s", sp.Expand(h.ProgressURL), h.Stall)
	}
	if w := h.Warmup; w != nil {
		row("warm-up", "%s %s%s within %s", w.Method, w.Path, prefix(" ", w.Body), h.WarmupTimeout)
	}
	r := p.Restart
	var mult []string
	for reason, f := range r.Backoff.Multiplier {
		mult = append(mult, fmt.Sprintf("%s x%g", reason, f))
	}
	slices.Sort(mult)
	row("backoff", "%s doubling to %s (min %s, jitter %g%%%s), reset after %s stable", r.Backoff.Initial, r.Backoff.Max, r.Backoff.Min, r.Backoff.JitterPercent, prefix(", ", strings.Join(mult, ", ")), r.Backoff.Stable)
	row("breaker", "opens after %d consecutive failures for %s (doubling to %s), closes after %s stable", r.Breaker.Threshold, r.Breaker.Open, r.Breaker.OpenMax, r.Breaker.Stable)
	row("storm", "at most %d restarts in %s, restart count reset after %s stable", r.Storm.Max, r.Storm.Window, r.RestartCountReset)
	for _, s := range p.Scope {
		row("scope", "%s=%s", s.Key, s.Raw)
	}
	tw.Flush()
}

// printSchedule runs the pool's own lifecycle machine through a crash
// loop on a simulated clock and prints every decision and the state it
// leaves the pool in.
func printSchedule(w io.Writer, p *config.Pool, reason crash.Reason, crashes int, runFor time.Duration, t0 time.Time) error {
	rng := rand.New(rand.NewPCG(1, uint64(len(p.ID))))
	sim := lifecycle.NewSim(lifecycle.Config{Pool: p.ID, Model: p.Model, FailureThreshold: p.Health.FailureThreshold,
		Stall: p.Health.Stall, Warmup: p.Health.Warmup != nil},
		policy.New(p.Restart, rng.Float64), t0)
	if err := sim.Start(); err != nil {
		return err
	}
	sim.Take()
	fmt.Fprintf(w, "\nrestart schedule of pool %s: %d crashes (%s), each restarted engine crashing %s after it is ready\n", p.ID, crashes, reason, runFor)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "crash\tat\tstate\tdecision\tbreaker\trestarts in window\tnotes")
	off := func(t time.Time) string { return "+" + t.Sub(t0).Round(time.Millisecond).String() }
	window := fmt.Sprintf("/%d in %s", p.Restart.Storm.Max, p.Restart.Storm.Window)
	for n := 1; n <= crashes; n++ {
		at := sim.Now
		if err := sim.Crash(reason); err != nil {
			return err
		}
		v := sim.M.View(sim.Now)
		decision := "restart in " + v.NextRestart.Sub(sim.Now).Round(time.Millisecond).String()
		if v.State == lifecycle.Failed {
			decision = "held until " + off(v.NextRestart)
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%d%s\t%s\n", n, off(at), v.State, decision, v.Policy.Breaker, v.Policy.RestartRate, window, strings.Join(describe(sim.Take()), "; "))
		started, err := sim.Restart()
		if err != nil {
			return err
		}
		v = sim.M.View(sim.Now)
		notes := strings.Join(describe(sim.Take()), "; ")
		if !started {
			fmt.Fprintf(tw, "\t%s\t%s\trestart refused, next try %s\t%s\t%d%s\t%s\n", off(sim.Now), v.State, off(v.NextRestart), v.Policy.Breaker, v.Policy.RestartRate, window, notes)
			break
		}
		if notes != "" {
			fmt.Fprintf(tw, "\t%s\t%s\trestarted\t%s\t%d%s\t%s\n", off(sim.Now), v.State, v.Policy.Breaker, v.Policy.RestartRate, window, notes)
		}
		sim.Advance(runFor)
	}
	return tw.Flush()
}

// describe keeps the events worth a line in the schedule.
func describe(events []journal.Event) []string {
	var out []string
	for _, e := range events {
		switch e := e.(type) {
		case policy.BreakerChanged:
			s := fmt.Sprintf("%s breaker %s -> %s", e.Class, e.From, e.To)
			out = append(out, s)
		case policy.StormWarning:
			out = append(out, fmt.Sprintf("storm warning (%d/%d)", e.InWindow, e.Max))
		case policy.StormDetected:
			out = append(out, fmt.Sprintf("STORM %s: %s", e.Kind, e.Kind.Hint()))
		case policy.Restarting:
			if e.Test {
				out = append(out, "test restart")
			}
		}
	}
	return out
}

func prefix(p, s string) string {
	if s == "" {
		return ""
	}
	return p + s
}
