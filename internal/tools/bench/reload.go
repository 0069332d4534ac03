package main

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/godbus/dbus/v5"

	api "github.com/llorch/pool-managerd/dbus"
	"github.com/llorch/pool-managerd/internal/bus"
	"github.com/llorch/pool-managerd/internal/journal"
	"github.com/llorch/pool-managerd/internal/storm"
)

// engineAlone is the engine's own start-to-healthy time: the simulator
// started directly on model, to its /health answering 200 (polled every
// millisecond on a new connection, as the daemon probes).
func (b *bench) engineAlone(model string) time.Duration {
	url := fmt.Sprintf("http://127.0.0.1:%d/health", b.alonePort)
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 2 * time.Second}
	cmd := exec.Command(b.sim, "--model", model, "--port", strconv.Itoa(b.alonePort))
	t0 := time.Now()
	must(cmd.Start())
	defer func() {
		cmd.Process.Kill()
		cmd.Wait()
	}()
	deadline := t0.Add(2 * time.Minute)
	for {
		resp, err := client.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return time.Since(t0)
			}
		}
		if time.Now().After(deadline) {
			must(fmt.Errorf("the engine alone on %s was not healthy within 2 minutes: %v", model, err))
		}
		time.Sleep(time.Millisecond)
	}
}

// reload asks for a reload of pool to ref and follows it through the
// pool's signals: when Ready went false, when Operation said "starting"
// (staging done), when the old engine was gone (Live=false), when the new
// one ran (Live=true) and when Ready was true again. A time a coalesced
// signal skipped is the next one seen.
type reloadTrace struct {
	call, down, staged, oldGone, newLive, up time.Time
}

func (b *bench) reload(w *watcher, pool, ref string) reloadTrace {
	path := api.PoolPath(pool)
	b.waitReady(pool)
	w.drain()
	var t reloadTrace
	t.call = time.Now()
	call := b.mgr.Go(bus.ManagerIface+".Reload", 0, nil, pool, ref, uint64(30000))
	replied := call.Done
	timeout := time.NewTimer(10 * time.Minute)
	defer timeout.Stop()
	var grace <-chan time.Time
	for t.up.IsZero() {
		select {
		case c := <-w.out:
			if c.path != path {
				continue
			}
			if t.down.IsZero() && c.has("Ready", false) {
				t.down = c.at
			}
			if t.down.IsZero() {
				continue
			}
			if t.staged.IsZero() && (c.has("Operation", "starting") || c.has("Live", false) || c.has("Live", true) || c.has("Ready", true)) {
				t.staged = c.at
			}
			if t.oldGone.IsZero() && (c.has("Live", false) || c.has("Live", true) || c.has("Ready", true)) {
				t.oldGone = c.at
			}
			if t.newLive.IsZero() && (c.has("Live", true) || c.has("Ready", true)) {
				t.newLive = c.at
			}
			if c.has("Ready", true) {
				t.up = c.at
			}
		case <-replied:
			if call.Err != nil {
				must(fmt.Errorf("reload of pool %s to %s: %w", pool, ref, call.Err))
			}
			// The reply follows the new engine's health: its signals
			// are at most a moment behind.
			replied, grace = nil, time.After(5*time.Second)
		case <-grace:
			must(fmt.Errorf("reload of pool %s to %s replied, but Ready never went false and back (the same model?)", pool, ref))
		case <-timeout.C:
			must(fmt.Errorf("reload of pool %s to %s: not done within 10 minutes", pool, ref))
		}
	}
	if replied != nil {
		<-replied
		must(call.Err)
	}
	return t
}

const reloadSamples = 3

var reloadFig = Figure{Name: "reload downtime", Unit: "ms", Basis: "median",
	Reference: "the engine alone, start to healthy",
	Goal:      Goal{Text: "overhead < 50 ms + hashing", Of: "overhead", AtMost: 50}}

// reloadRound: how long Ready is false during a Reload to a new model
// (fresh content each time, so its digest is new), against the engine's
// own start-to-healthy time on that model. The hash runs before the
// drain, while the pool still serves: it is reported apart and the goal
// allows for it.
func (b *bench) reloadRound(r int, figs *Figures) {
	w := watch(b.conn, dbus.WithMatchPathNamespace(bus.ManagerPath))
	defer w.close()
	var down, alone []time.Duration
	var over, hash, stage, stop, start, healthy []float64
	for i := range reloadSamples {
		name := fmt.Sprintf("reload-%d-%d.gguf", r, i)
		p := b.writeModel(name, name)
		t := b.reload(w, benchPool, name)
		a := b.engineAlone(p)
		down, alone = append(down, t.up.Sub(t.down)), append(alone, a)
		over = append(over, ms(t.up.Sub(t.down)-a))
		hash = append(hash, ms(t.down.Sub(t.call)))
		stage = append(stage, ms(t.staged.Sub(t.down)))
		stop = append(stop, ms(t.oldGone.Sub(t.staged)))
		start = append(start, ms(t.newLive.Sub(t.oldGone)))
		healthy = append(healthy, ms(t.up.Sub(t.newLive)))
		if i > 0 {
			os.Remove(filepath.Join(b.dir, "models", fmt.Sprintf("reload-%d-%d.gguf", r, i-1)))
		}
	}
	rd := newRound(r, reloadFig.Basis, msAll(down), msAll(alone))
	rd.Overhead, rd.Allowance = median(over), median(hash)
	rd.Parts = map[string]float64{
		"0 hash, before the drain": median(hash), "1 stage": median(stage), "2 old engine stopped": median(stop),
		"3 new engine running": median(start), "4 healthy": median(healthy), "overhead": median(over),
	}
	figs.add(reloadFig, rd)
}

var (
	hashFig = Figure{Name: "staging: hashing throughput", Unit: "MB/s", Basis: "throughput",
		Reference: "sha256sum of the same file", Goal: Goal{Text: "ratio >= 1.0", Of: "ratio", AtLeast: 1.0}}
	cachedFig = Figure{Name: "staging: second reload, unchanged model", Unit: "ms", Basis: "value",
		Reference: "first staging of it (hashed)", Goal: Goal{Text: "< 5 ms", Of: "value", AtMost: 5}}
)

// stagingRound: the daemon's hash of a big model (its mtime just changed,
// so the digest cache cannot answer) from the Reload call to the drain,
// which begins once the hash is done, against sha256sum of the same file;
// then, after a reload away and back, the second staging of the unchanged
// file: from the Reload call to Operation "starting" (the digest, the
// drain of no leases and the staging), against the first one's.
func (b *bench) stagingRound(r int, figs *Figures) {
	w := watch(b.conn, dbus.WithMatchPathNamespace(bus.ManagerPath))
	defer w.close()
	big := filepath.Join(b.dir, "models", b.bigModel)
	st, err := os.Stat(big)
	must(err)
	size := float64(st.Size())
	now := time.Now()
	must(os.Chtimes(big, now, now))
	first := b.reload(w, benchPool, b.bigModel)
	hashed := first.down.Sub(first.call)

	t0 := time.Now()
	if out, err := exec.Command("sha256sum", big).CombinedOutput(); err != nil {
		must(fmt.Errorf("sha256sum: %v: %s", err, out))
	}
	ref := time.Since(t0)

	b.reload(w, benchPool, smallModel)
	second := b.reload(w, benchPool, b.bigModel)
	b.reload(w, benchPool, smallModel)

	mbps := func(d time.Duration) float64 { return size / 1e6 / d.Seconds() }
	hr := newRound(r, hashFig.Basis, []float64{mbps(hashed)}, []float64{mbps(ref)})
	hr.Parts = map[string]float64{"daemon hash (s)": hashed.Seconds(), "sha256sum (s)": ref.Seconds()}
	figs.add(hashFig, hr)
	cr := newRound(r, cachedFig.Basis, []float64{ms(second.staged.Sub(second.call))}, []float64{ms(first.staged.Sub(first.call))})
	cr.Ratio = 0
	cr.Parts = map[string]float64{"1 digest, before the drain": ms(second.down.Sub(second.call)), "2 stage, in the drain": ms(second.staged.Sub(second.down))}
	figs.add(cachedFig, cr)
}

var readyFig = Figure{Name: "crash to ready, default policy", Unit: "ms", Basis: "median",
	Reference: "the backoff (journal) + the engine alone",
	Goal:      Goal{Text: "overhead < 30 ms", Of: "overhead", AtMost: 30}}

// readyRound: SIGKILL of the default-policy pool's engine -> Ready=true
// again, against the backoff the daemon chose (BACKOFF_MS: the first
// backoff of the default policy, jittered) plus the engine's own start to
// healthy. ResetBreaker before each kill makes every crash the first of
// its streak; few kills keep within the default storm limit.
func (b *bench) readyRound(r int, figs *Figures) {
	n := 2
	if b.opts.Rounds*n > storm.Defaults().Max {
		n = 1
	}
	w := watch(b.conn, dbus.WithMatchPathNamespace(bus.ManagerPath))
	defer w.close()
	path := api.PoolPath(dfltPool)
	var c2r, ref []time.Duration
	var over, detect, launch, healthy, backoffs, alones []float64
	for range n {
		must(b.mgr.Call(bus.ManagerIface+".ResetBreaker", 0, dfltPool).Err)
		b.waitReady(dfltPool)
		pid := int(b.get(dfltPool, "MainPID").(uint32))
		w.drain()
		since := time.Now()
		t0 := time.Now()
		must(syscall.Kill(pid, syscall.SIGKILL))
		var down, live time.Time
		up := w.until(path, 2*time.Minute, "Ready=true after a crash", func(c change) bool {
			if down.IsZero() && c.has("Ready", false) {
				down = c.at
			}
			if !down.IsZero() && live.IsZero() && c.has("Live", true) {
				live = c.at
			}
			return !down.IsZero() && c.has("Ready", true)
		}).at
		if live.IsZero() {
			live = up
		}
		es := journalEntries(since, 1, "MESSAGE_ID="+string(journal.MsgRestartScheduled), journal.PoolID+"="+dfltPool)
		if len(es) == 0 {
			must(fmt.Errorf("no restart of pool %s was logged", dfltPool))
		}
		bo := time.Duration(field(es[0], journal.BackoffMS)) * time.Millisecond
		a := b.engineAlone(filepath.Join(b.dir, "models", smallModel))
		c2r, ref = append(c2r, up.Sub(t0)), append(ref, bo+a)
		over = append(over, ms(up.Sub(t0)-bo-a))
		detect = append(detect, ms(down.Sub(t0)))
		launch = append(launch, ms(live.Sub(down)-bo))
		healthy = append(healthy, ms(up.Sub(live)))
		backoffs, alones = append(backoffs, ms(bo)), append(alones, ms(a))
	}
	rd := newRound(r, readyFig.Basis, msAll(c2r), msAll(ref))
	rd.Overhead = median(over)
	rd.Parts = map[string]float64{
		"1 crash seen (Ready=false)": median(detect), "2 backoff": median(backoffs), "3 engine running, less backoff": median(launch),
		"4 healthy (Ready=true)": median(healthy), "engine alone": median(alones), "overhead": median(over),
	}
	figs.add(readyFig, rd)
}
