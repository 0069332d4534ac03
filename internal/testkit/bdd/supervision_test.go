package bdd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cucumber/godog"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/llorch/pool-managerd/internal/crash"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/metrics"
	"github.com/llorch/pool-managerd/internal/policy"
	"github.com/llorch/pool-managerd/internal/testkit/bdd/capture"
	"github.com/llorch/pool-managerd/internal/testkit/bdd/suite"
)

// The seed's policy scenarios: backoff (9), circuit breaker (11), restart
// storm (10).
const supervisionScenarios = 30

func TestSupervisionFeatures(t *testing.T) {
	suite.Run(t, "supervision", supervisionScenarios, initSupervision,
		"features/supervision/backoff.feature",
		"features/supervision/circuit_breaker.feature",
		"features/supervision/restart_storm.feature")
}

// epoch is the simulated clock's start; journal timestamps in the
// scenarios are relative to it.
var epoch = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

type simPool struct {
	id     string
	params policy.Params
	tr     *policy.Tracker
	// last is the decision on the latest crash.
	last    *policy.Decision
	delays  []time.Duration
	permit  *policy.Permit
	refused error
	storm   *policy.StormDetected
}

type world struct {
	now     time.Time
	params  policy.Params
	rng     *rand.Rand
	pools   map[string]*simPool
	order   []*simPool
	herd    []*simPool
	reg     *prometheus.Registry
	metrics *metrics.Set
	logs    *capture.Log
	log     *slog.Logger
	// firstRestart is when the current pool first restarted.
	firstRestart time.Time
}

func newWorld() *world {
	reg := prometheus.NewRegistry()
	logs := capture.NewLog()
	return &world{
		now:     epoch,
		params:  policy.Defaults(),
		rng:     rand.New(rand.NewPCG(20260101, 42)),
		pools:   map[string]*simPool{},
		reg:     reg,
		metrics: metrics.New(reg),
		logs:    logs,
		log:     slog.New(logs),
	}
}

func (w *world) addPool(id string) *simPool {
	p := &simPool{id: id, params: w.params}
	w.pools[id] = p
	w.order = append(w.order, p)
	return p
}

// pool returns the named pool, or the first one when name is empty.
func (w *world) pool(name string) (*simPool, error) {
	if name == "" {
		if len(w.order) == 0 {
			return nil, errors.New("no pool defined")
		}
		return w.order[0], nil
	}
	p, ok := w.pools[name]
	if !ok {
		return nil, fmt.Errorf("no pool %q defined", name)
	}
	return p, nil
}

func (w *world) tracker(p *simPool) *policy.Tracker {
	if p.tr == nil {
		p.tr = policy.New(p.params, w.rng.Float64)
	}
	return p.tr
}

// setParams changes the policy of every pool that has not started yet and
// of pools defined later.
func (w *world) setParams(f func(*policy.Params)) error {
	f(&w.params)
	for _, p := range w.order {
		if p.tr != nil {
			return fmt.Errorf("pool %q already has history: set its policy before it runs", p.id)
		}
		f(&p.params)
	}
	return nil
}

// emit does what the daemon's pool owner does with policy events: write
// them to the journal and update the metrics.
func (w *world) emit(p *simPool, events []policy.Event) {
	journal.Emit(context.Background(), w.log, p.id, events...)
	w.metrics.Policy(p.id, events, w.tracker(p).Status(w.now))
	for _, e := range events {
		if s, ok := e.(policy.StormDetected); ok {
			p.storm = &s
		}
	}
}

func (w *world) crash(p *simPool, r crash.Reason) {
	d := w.tracker(p).Crash(w.now, r)
	p.last = &d
	if !d.Held {
		p.delays = append(p.delays, d.Delay)
	}
	w.emit(p, d.Events)
}

// advance moves the clock and lets every pool's policy see the time pass,
// as the daemon's timers would at NextTick.
func (w *world) advance(d time.Duration) {
	target := w.now.Add(d)
	for {
		var next time.Time
		for _, p := range w.order {
			if p.tr == nil {
				continue
			}
			if t := p.tr.NextTick(); !t.IsZero() && t.After(w.now) && !t.After(target) && (next.IsZero() || t.Before(next)) {
				next = t
			}
		}
		if next.IsZero() {
			break
		}
		w.tick(next)
	}
	w.tick(target)
}

func (w *world) tick(t time.Time) {
	w.now = t
	for _, p := range w.order {
		if p.tr != nil {
			w.emit(p, p.tr.Tick(w.now))
		}
	}
}

// attempt asks the policy for a restart now.
func (w *world) attempt(p *simPool) error {
	pm, err := w.tracker(p).Restart(w.now)
	w.emit(p, pm.Events)
	p.permit, p.refused = nil, err
	if err == nil {
		p.permit = &pm
		if w.firstRestart.IsZero() {
			w.firstRestart = w.now
		}
	}
	return err
}

// restart waits for the scheduled restart and performs it; it fails when
// the policy refuses.
func (w *world) restart(p *simPool) error {
	if p.last == nil {
		return errors.New("the engine has not crashed")
	}
	if p.last.At.After(w.now) {
		w.advance(p.last.At.Sub(w.now))
	}
	if err := w.attempt(p); err != nil {
		return fmt.Errorf("restart of %q refused: %w", p.id, err)
	}
	return nil
}

func (w *world) healthy(p *simPool) {
	w.emit(p, w.tracker(p).Healthy(w.now))
}

// crashLoop crashes the engine n times, restarting it whenever the policy
// allows, with reasons taken in turn from rs.
func (w *world) crashLoop(p *simPool, n int, rs ...crash.Reason) error {
	for i := range n {
		if i > 0 {
			if err := w.restart(p); err != nil {
				return err
			}
		}
		w.crash(p, rs[i%len(rs)])
	}
	return nil
}

func reasons(list string) ([]crash.Reason, error) {
	var out []crash.Reason
	for _, s := range strings.Split(list, ",") {
		r, err := crash.ParseReason(strings.TrimSpace(s))
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, nil
}

func ms(n int) time.Duration { return time.Duration(n) * time.Millisecond }

func secs(s string) (time.Duration, error) {
	f, err := strconv.ParseFloat(s, 64)
	return time.Duration(f * float64(time.Second)), err
}

// state is the pool's lifecycle state as the policy leaves it: a crash
// the policy holds fails the pool, one it schedules backs it off.
func (w *world) state(p *simPool) string {
	st := w.tracker(p).Status(w.now)
	switch {
	case st.Pending && p.last != nil && p.last.Held:
		return lifecycle.Failed.String()
	case st.Pending:
		return lifecycle.Backoff.String()
	}
	return lifecycle.Ready.String()
}

var entryKinds = map[string]journal.MessageID{
	"crash":             journal.MsgCrash,
	"restart scheduled": journal.MsgRestartScheduled,
	"breaker changed":   journal.MsgBreakerChanged,
	"restart storm":     journal.MsgStorm,
	"storm warning":     journal.MsgStormWarning,
	"restarting":        journal.MsgRestart,
	"recovered":         journal.MsgRecovered,
	"operator override": journal.MsgOperator,
}

func (w *world) entries(kind string) ([]capture.Entry, error) {
	id, ok := entryKinds[kind]
	if !ok {
		return nil, fmt.Errorf("unknown journal entry kind %q", kind)
	}
	var out []capture.Entry
	for _, e := range w.logs.All() {
		if e.Fields[journal.MessageIDField] == string(id) {
			out = append(out, e)
		}
	}
	return out, nil
}

// findEntry returns the latest entry of the kind whose fields include all
// of want.
func (w *world) findEntry(kind string, want map[string]string) (capture.Entry, error) {
	es, err := w.entries(kind)
	if err != nil {
		return capture.Entry{}, err
	}
	for _, e := range slices.Backward(es) {
		ok := true
		for k, v := range want {
			if e.Fields[k] != v {
				ok = false
				break
			}
		}
		if ok {
			return e, nil
		}
	}
	var seen []string
	for _, e := range es {
		seen = append(seen, fmt.Sprint(e.Fields))
	}
	return capture.Entry{}, fmt.Errorf("no %q entry with %v; %q entries: %v", kind, want, kind, seen)
}

func tableFields(t *godog.Table) map[string]string {
	m := map[string]string{}
	for _, r := range t.Rows {
		m[r.Cells[0].Value] = r.Cells[1].Value
	}
	return m
}

func initSupervision(sc *godog.ScenarioContext) {
	w := newWorld()

	// Pools and their policy.
	sc.Step(`^a pool "([^"]+)" with the default restart policy$`, func(id string) { w.addPool(id) })
	sc.Step(`^a pool "([^"]+)" with the default restart policy and (\d+) percent jitter$`, func(id string, j int) {
		w.addPool(id).params.Backoff.JitterPercent = float64(j)
	})
	sc.Step(`^backoff jitter is disabled$`, func() error {
		return w.setParams(func(p *policy.Params) { p.Backoff.JitterPercent = 0 })
	})
	sc.Step(`^the breaker threshold is (\d+)$`, func(n int) error {
		return w.setParams(func(p *policy.Params) { p.Breaker.Threshold = n })
	})
	sc.Step(`^the backoff initial delay is (\d+) ms and the minimum delay is (\d+) ms$`, func(i, m int) error {
		return w.setParams(func(p *policy.Params) { p.Backoff.Initial, p.Backoff.Min = ms(i), ms(m) })
	})
	sc.Step(`^the backoff is fixed at (\d+) ms$`, func(n int) error {
		return w.setParams(func(p *policy.Params) { p.Backoff.Initial, p.Backoff.Min, p.Backoff.Max = ms(n), ms(n), ms(n) })
	})

	// Crashes and restarts.
	crashWith := func(r crash.Reason) func(string) error {
		return func(name string) error {
			p, err := w.pool(name)
			if err == nil {
				w.crash(p, r)
			}
			return err
		}
	}
	sc.Step(`^the engine(?: of "([^"]+)")? crashes with exit code \d+$`, crashWith(crash.ExitCode))
	sc.Step(`^the engine(?: of "([^"]+)")? crashes with a CUDA error$`, crashWith(crash.CUDAError))
	restartCrash := func(r crash.Reason) func(string) error {
		return func(name string) error {
			p, err := w.pool(name)
			if err != nil {
				return err
			}
			if err := w.restart(p); err != nil {
				return err
			}
			w.crash(p, r)
			return nil
		}
	}
	sc.Step(`^the engine(?: of "([^"]+)")? restarts and crashes with exit code \d+$`, restartCrash(crash.ExitCode))
	sc.Step(`^the engine(?: of "([^"]+)")? restarts and crashes with a CUDA error$`, restartCrash(crash.CUDAError))
	loop := func(name, cuda string, n int) error {
		p, err := w.pool(name)
		if err != nil {
			return err
		}
		r := crash.ExitCode
		if cuda != "" {
			r = crash.CUDAError
		}
		return w.crashLoop(p, n, r)
	}
	sc.Step(`^the engine(?: of "([^"]+)")? crashes( with a CUDA error)? (\d+) times in a row$`, loop)
	sc.Step(`^the engine has crashed (\d+) times in a row$`, func(n int) error { return loop("", "", n) })
	sc.Step(`^the engine of "([^"]+)" crashes in a row with ([a-z_, ]+)$`, func(name, list string) error {
		p, err := w.pool(name)
		if err != nil {
			return err
		}
		rs, err := reasons(list)
		if err != nil {
			return err
		}
		return w.crashLoop(p, len(rs), rs...)
	})
	cycles := func(n int, run string) error {
		p, err := w.pool("")
		if err != nil {
			return err
		}
		runFor := time.Duration(0)
		if run != "" {
			if runFor, err = secs(run); err != nil {
				return err
			}
		}
		for range n {
			w.crash(p, crash.ExitCode)
			if err := w.restart(p); err != nil {
				return err
			}
			w.advance(runFor)
		}
		return nil
	}
	sc.Step(`^the engine crashes and restarts (\d+) times?(?:, running ([\d.]+) seconds each time)?$`, cycles)
	sc.Step(`^the engine has crashed and restarted (\d+) times$`, func(n int) error { return cycles(n, "") })
	sc.Step(`^the engine(?: of "([^"]+)")? crash-loops with ([a-z_, ]+) until a restart storm$`, func(name, list string) error {
		p, err := w.pool(name)
		if err != nil {
			return err
		}
		rs, err := reasons(list)
		if err != nil {
			return err
		}
		for i := 0; p.storm == nil; i++ {
			if i == 100 {
				return fmt.Errorf("no restart storm after %d crashes", i)
			}
			if i > 0 {
				if err := w.restart(p); err != nil {
					return err
				}
			}
			w.crash(p, rs[i%len(rs)])
		}
		return nil
	})
	sc.Step(`^the engine restarts and runs healthy for (\d+) seconds$`, func(n int) error {
		p, _ := w.pool("")
		if err := w.restart(p); err != nil {
			return err
		}
		w.healthy(p)
		w.advance(time.Duration(n) * time.Second)
		return nil
	})
	sc.Step(`^the engine runs healthy for (\d+) seconds$`, func(n int) error {
		p, err := w.pool("")
		if err != nil {
			return err
		}
		w.healthy(p)
		w.advance(time.Duration(n) * time.Second)
		return nil
	})
	sc.Step(`^(\d+) seconds? pass(?:es)?$`, func(n int) { w.advance(time.Duration(n) * time.Second) })
	sc.Step(`^the clock reaches (\d+) seconds$`, func(n int) error {
		t := epoch.Add(time.Duration(n) * time.Second)
		if t.Before(w.now) {
			return fmt.Errorf("the clock is already at %s", w.now.Sub(epoch))
		}
		w.advance(t.Sub(w.now))
		return nil
	})

	// Restart decisions.
	scheduledAfter := func(name string, n int) error {
		p, err := w.pool(name)
		if err != nil {
			return err
		}
		if p.last == nil {
			return errors.New("no crash happened")
		}
		if p.last.Held {
			return fmt.Errorf("the restart is held until %s, not scheduled", p.last.At)
		}
		if p.last.Delay != ms(n) {
			return fmt.Errorf("restart delay is %s, want %s", p.last.Delay, ms(n))
		}
		return nil
	}
	sc.Step(`^a restart is scheduled after (\d+) ms$`, func(n int) error { return scheduledAfter("", n) })
	sc.Step(`^the restart of "([^"]+)" is scheduled after (\d+) ms$`, scheduledAfter)
	sc.Step(`^a restart is scheduled$`, func() error {
		p, _ := w.pool("")
		if p.last == nil || p.last.Held {
			return errors.New("no restart is scheduled")
		}
		return nil
	})
	sc.Step(`^no restart is scheduled$`, func() error {
		p, _ := w.pool("")
		if p.last == nil || !p.last.Held {
			return fmt.Errorf("a restart is scheduled: %+v", p.last)
		}
		// The journal says so too: the pool's latest restart decision is
		// a hold, with no backoff delay.
		es, err := w.entries("restart scheduled")
		if err != nil {
			return err
		}
		for _, e := range slices.Backward(es) {
			if e.Fields[journal.PoolID] != p.id {
				continue
			}
			if _, ok := e.Fields[journal.BackoffMS]; ok || e.Level != slog.LevelWarn {
				return fmt.Errorf("the latest restart decision in the journal is not a hold: %v", e.Fields)
			}
			return nil
		}
		return errors.New("no restart decision in the journal")
	})
	sc.Step(`^the restart delays are ([\d, ]+) ms$`, func(list string) error {
		p, _ := w.pool("")
		var want []time.Duration
		for _, s := range strings.Split(list, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(s))
			if err != nil {
				return err
			}
			want = append(want, ms(n))
		}
		if !slices.Equal(p.delays, want) {
			return fmt.Errorf("restart delays are %v, want %v", p.delays, want)
		}
		return nil
	})
	sc.Step(`^none of the restart delays of "([^"]+)" exceeds (\d+) ms$`, func(name string, n int) error {
		p, err := w.pool(name)
		if err != nil {
			return err
		}
		if len(p.delays) == 0 {
			return errors.New("no restart delays")
		}
		if m := slices.Max(p.delays); m > ms(n) {
			return fmt.Errorf("a restart delay of %s exceeds %s", m, ms(n))
		}
		return nil
	})
	sc.Step(`^at least (\d+) of the last (\d+) restart delays of "([^"]+)" are below (\d+) ms$`, func(k, last int, name string, n int) error {
		p, err := w.pool(name)
		if err != nil {
			return err
		}
		if len(p.delays) < last {
			return fmt.Errorf("only %d restart delays", len(p.delays))
		}
		below := 0
		for _, d := range p.delays[len(p.delays)-last:] {
			if d < ms(n) {
				below++
			}
		}
		if below < k {
			return fmt.Errorf("%d of the last %d delays are below %s, want at least %d", below, last, ms(n), k)
		}
		return nil
	})
	sc.Step(`^the pool state is "([^"]+)"$`, func(want string) error {
		p, _ := w.pool("")
		if s := w.state(p); s != want {
			return fmt.Errorf("pool state is %q, want %q", s, want)
		}
		return nil
	})
	sc.Step(`^the next restart is not before (\d+) seconds after the first restart$`, func(n int) error {
		p, _ := w.pool("")
		if w.firstRestart.IsZero() || p.last == nil {
			return errors.New("no restart and crash happened")
		}
		if earliest := w.firstRestart.Add(time.Duration(n) * time.Second); p.last.At.Before(earliest) {
			return fmt.Errorf("next restart at %s, before %s", p.last.At.Sub(epoch), earliest.Sub(epoch))
		}
		return nil
	})

	// Herds of pools crashing at once.
	herd := func(n int, jitter float64) {
		w.herd = nil
		for i := range n {
			p := &simPool{id: fmt.Sprintf("herd-%03d", i), params: w.params}
			p.params.Backoff.JitterPercent = jitter
			w.herd = append(w.herd, p)
		}
	}
	herdCrash := func() {
		for _, p := range w.herd {
			w.crash(p, crash.ExitCode)
		}
	}
	sc.Step(`^(\d+) pools with the default restart policy$`, func(n int) { herd(n, policy.Defaults().Backoff.JitterPercent) })
	sc.Step(`^every one of those engines crashes with exit code \d+ at the same moment$`, herdCrash)
	sc.Step(`^(\d+) pools with this policy and (\d+) percent jitter crash at the same moment$`, func(n, j int) {
		herd(n, float64(j))
		herdCrash()
	})
	herdDelays := func() ([]time.Duration, error) {
		var out []time.Duration
		for _, p := range w.herd {
			if len(p.delays) != 1 {
				return nil, fmt.Errorf("pool %s has %d restart delays", p.id, len(p.delays))
			}
			out = append(out, p.delays[0])
		}
		if len(out) == 0 {
			return nil, errors.New("no herd of pools")
		}
		return out, nil
	}
	sc.Step(`^every one of their restart delays is between (\d+) and (\d+) ms$`, func(lo, hi int) error {
		ds, err := herdDelays()
		if err != nil {
			return err
		}
		for _, d := range ds {
			if d < ms(lo) || d > ms(hi) {
				return fmt.Errorf("restart delay %s is outside [%s, %s]", d, ms(lo), ms(hi))
			}
		}
		return nil
	})
	sc.Step(`^their restart delays spread over at least (\d+) ms$`, func(n int) error {
		ds, err := herdDelays()
		if err != nil {
			return err
		}
		if spread := slices.Max(ds) - slices.Min(ds); spread < ms(n) {
			return fmt.Errorf("restart delays spread over %s only", spread)
		}
		return nil
	})
	sc.Step(`^at least (\d+) of their restart delays are distinct$`, func(n int) error {
		ds, err := herdDelays()
		if err != nil {
			return err
		}
		slices.Sort(ds)
		if d := len(slices.Compact(ds)); d < n {
			return fmt.Errorf("only %d distinct restart delays", d)
		}
		return nil
	})

	// Circuit breaker.
	breakerIs := func(p *simPool, class crash.Class, want string) error {
		st := w.tracker(p).Status(w.now)
		got := st.Breaker
		if class != "" {
			got = st.Breakers[class].State
		}
		if got.String() != want {
			return fmt.Errorf("circuit breaker %s of %q is %q, want %q", class, p.id, got, want)
		}
		return nil
	}
	sc.Step(`^the circuit breaker is "([^"]+)"$`, func(want string) error {
		p, _ := w.pool("")
		return breakerIs(p, "", want)
	})
	sc.Step(`^the "([a-z]+)" breaker(?: of "([^"]+)")? is "([^"]+)"$`, func(class, name, want string) error {
		p, err := w.pool(name)
		if err != nil {
			return err
		}
		return breakerIs(p, crash.Class(class), want)
	})
	sc.Step(`^the "([a-z]+)" breaker has (\d+) consecutive failures$`, func(class string, n int) error {
		p, _ := w.pool("")
		if got := w.tracker(p).Status(w.now).Breakers[crash.Class(class)].Failures; got != n {
			return fmt.Errorf("%s breaker has %d consecutive failures, want %d", class, got, n)
		}
		return nil
	})
	opened := func() error {
		p, _ := w.pool("")
		if err := w.crashLoop(p, p.params.Breaker.Threshold, crash.ExitCode); err != nil {
			return err
		}
		return breakerIs(p, "", "open")
	}
	halfOpen := func() error {
		if err := opened(); err != nil {
			return err
		}
		p, _ := w.pool("")
		w.advance(p.last.At.Sub(w.now))
		return breakerIs(p, "", "half-open")
	}
	sc.Step(`^the circuit breaker has opened$`, opened)
	sc.Step(`^the circuit breaker is half-open$`, halfOpen)
	sc.Step(`^the circuit breaker stays open for (\d+) seconds$`, func(n int) error {
		p, _ := w.pool("")
		if err := breakerIs(p, "", "open"); err != nil {
			return err
		}
		w.advance(time.Duration(n-1) * time.Second)
		if err := breakerIs(p, "", "open"); err != nil {
			return fmt.Errorf("after %d s: %w", n-1, err)
		}
		w.advance(time.Second)
		return breakerIs(p, "", "half-open")
	})
	sc.Step(`^the test restart fails (\d+) more times$`, func(n int) error {
		p, _ := w.pool("")
		for i := range n {
			if i > 0 {
				w.advance(p.last.At.Sub(w.now))
			}
			if err := w.restart(p); err != nil {
				return err
			}
			if p.permit == nil || !p.permit.Test {
				return errors.New("the restart was not a test restart")
			}
			w.crash(p, crash.ExitCode)
		}
		return breakerIs(p, "", "open")
	})

	// Restart attempts and operator overrides.
	attempt := func() error {
		p, _ := w.pool("")
		w.attempt(p)
		return nil
	}
	sc.Step(`^a restart is attempted$`, attempt)
	sc.Step(`^another restart is attempted$`, attempt)
	allowed := func(kind string) error {
		p, _ := w.pool("")
		if p.permit == nil {
			return fmt.Errorf("the restart was refused: %v", p.refused)
		}
		switch {
		case kind == "a test restart" && !p.permit.Test:
			return errors.New("the restart is not a test restart")
		case kind == "an override" && !p.permit.Override:
			return errors.New("the restart is not an operator override")
		case kind == "" && (p.permit.Test || p.permit.Override):
			return fmt.Errorf("the restart is special: %+v", *p.permit)
		}
		return nil
	}
	sc.Step(`^the restart is allowed$`, func() error { return allowed("") })
	sc.Step(`^the restart is allowed as (a test restart|an override)$`, allowed)
	refusedBecause := func(p *simPool, why string) error {
		var r *policy.Refusal
		if !errors.As(p.refused, &r) {
			return fmt.Errorf("the restart was not refused by the policy: permit %+v, error %v", p.permit, p.refused)
		}
		if why != "" && r.Why != why {
			return fmt.Errorf("refused because %q, want %q", r.Why, why)
		}
		return nil
	}
	sc.Step(`^a restart attempt is refused(?: because "([^"]+)")?$`, func(why string) error {
		p, _ := w.pool("")
		w.attempt(p)
		return refusedBecause(p, why)
	})
	sc.Step(`^the attempt is refused because "([^"]+)"$`, func(why string) error {
		p, _ := w.pool("")
		return refusedBecause(p, why)
	})
	sc.Step(`^the operator resets the circuit breaker$`, func() {
		p, _ := w.pool("")
		w.emit(p, w.tracker(p).ResetBreaker(w.now))
	})
	sc.Step(`^the operator allows a restart$`, func() error {
		p, _ := w.pool("")
		ev, err := w.tracker(p).AllowRestart(w.now)
		w.emit(p, ev)
		return err
	})

	// Counters.
	count := func(what string, get func(policy.Status) int) func(int) error {
		return func(n int) error {
			p, _ := w.pool("")
			if got := get(w.tracker(p).Status(w.now)); got != n {
				return fmt.Errorf("%s is %d, want %d", what, got, n)
			}
			return nil
		}
	}
	sc.Step(`^the restart count is (\d+)$`, count("restart count", func(s policy.Status) int { return int(s.RestartCount) }))
	sc.Step(`^the crash count is (\d+)$`, count("crash count", func(s policy.Status) int { return int(s.CrashCount) }))
	sc.Step(`^the restart rate is (\d+)$`, count("restart rate", func(s policy.Status) int { return s.RestartRate }))

	// Storm verdicts.
	sc.Step(`^the restart storm of "([^"]+)" is "([^"]+)" with a hint that mentions "([^"]+)"$`, func(name, kind, hint string) error {
		p, err := w.pool(name)
		if err != nil {
			return err
		}
		if p.storm == nil {
			return fmt.Errorf("pool %q had no restart storm", name)
		}
		if string(p.storm.Kind) != kind {
			return fmt.Errorf("storm kind is %q, want %q", p.storm.Kind, kind)
		}
		e, err := w.findEntry("restart storm", map[string]string{journal.PoolID: name, journal.StormKind: kind})
		if err != nil {
			return err
		}
		if !strings.Contains(e.Fields[journal.Hint], hint) {
			return fmt.Errorf("hint %q does not mention %q", e.Fields[journal.Hint], hint)
		}
		return nil
	})

	// Journal.
	sc.Step(`^the journal has a "([^"]+)" entry with fields:$`, func(kind string, t *godog.Table) error {
		_, err := w.findEntry(kind, tableFields(t))
		return err
	})
	sc.Step(`^the journal has a "([^"]+)" entry at level critical \(PRIORITY=2\) with fields:$`, func(kind string, t *godog.Table) error {
		e, err := w.findEntry(kind, tableFields(t))
		if err != nil {
			return err
		}
		if e.Level != journal.LevelCritical {
			return fmt.Errorf("entry level is %s, want critical", e.Level)
		}
		return nil
	})
	sc.Step(`^the journal has no "([^"]+)" entry$`, func(kind string) error {
		es, err := w.entries(kind)
		if err == nil && len(es) > 0 {
			err = fmt.Errorf("%d %q entries: %v", len(es), kind, es[0].Fields)
		}
		return err
	})
	sc.Step(`^the "([^"]+)" entry's HINT mentions "([^"]+)"$`, func(kind, s string) error {
		e, err := w.findEntry(kind, nil)
		if err != nil {
			return err
		}
		if !strings.Contains(e.Fields[journal.Hint], s) {
			return fmt.Errorf("HINT %q does not mention %q", e.Fields[journal.Hint], s)
		}
		return nil
	})

	// Metrics.
	sc.Step(`^the metric (\S+) is (\S+)$`, func(s string, want float64) error {
		m, t, err := capture.Series(w.reg, s)
		if err != nil {
			return err
		}
		v, err := capture.Value(m, t)
		if err == nil && v != want {
			err = fmt.Errorf("%s is %g, want %g", s, v, want)
		}
		return err
	})
	sc.Step(`^the metric (\S+) has (\d+) observations summing to (\S+)$`, func(s string, n int, sum float64) error {
		m, t, err := capture.Series(w.reg, s)
		if err != nil {
			return err
		}
		if t != dto.MetricType_HISTOGRAM {
			return fmt.Errorf("%s is a %s, not a histogram", s, t)
		}
		h := m.GetHistogram()
		if int(h.GetSampleCount()) != n || h.GetSampleSum() != sum {
			return fmt.Errorf("%s has %d observations summing to %g, want %d summing to %g", s, h.GetSampleCount(), h.GetSampleSum(), n, sum)
		}
		return nil
	})
}
