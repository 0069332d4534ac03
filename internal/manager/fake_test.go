package manager_test

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/gpu"
	"github.com/llorch/pool-managerd/internal/lifecycle"
	"github.com/llorch/pool-managerd/internal/manager"
	"github.com/llorch/pool-managerd/internal/metrics"
	"github.com/llorch/pool-managerd/internal/model"
	"github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/testkit/testpool"
	"github.com/llorch/pool-managerd/internal/users"
)

// fakePool stands in for a pool's supervisor where no systemd runs
// engines: it keeps a snapshot the test sets and records what the manager
// asks of it.
type fakePool struct {
	cfg  *config.Pool
	m    *manager.Manager // to see whether it is registered when drained
	done chan struct{}    // closed when its loop ends

	mu      sync.Mutex
	snap    supervisor.Snapshot
	changed chan struct{}
	calls   []string
	// drainedWhileServed is whether the manager still served the pool
	// when it was drained.
	drainedWhileServed bool
	hung               bool // Ping never answers
	adoptable          bool
	// parkGate, when set, holds Park (its drain) until closed; parkErr
	// fails it.
	parkGate chan struct{}
	parkErr  error
	// onReady, when set, is called as EnsureReady makes the pool Ready.
	onReady func()
	// onFlush, when set, runs as Flush does, as the pool's loop would
	// before it gets to the flush.
	onFlush func()
}

func newFakePool(p *config.Pool, m *manager.Manager) *fakePool {
	return &fakePool{cfg: p, m: m, done: make(chan struct{}), changed: make(chan struct{}),
		snap: supervisor.Snapshot{ID: p.ID, View: lifecycle.View{State: lifecycle.Stopped}, Slots: p.Slots}}
}

func (f *fakePool) record(call string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, call)
}

// Calls are what the manager asked of the pool, in order.
func (f *fakePool) Calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}

// set changes the snapshot and wakes its waiters.
func (f *fakePool) set(change func(*supervisor.Snapshot)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	change(&f.snap)
	close(f.changed)
	f.changed = make(chan struct{})
}

// running says whether the pool's loop runs.
func (f *fakePool) running() bool {
	select {
	case <-f.done:
		return false
	default:
		return true
	}
}

func (f *fakePool) Snapshot() supervisor.Snapshot {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.snap
}

func (f *fakePool) Wait(ctx context.Context, cond func(supervisor.Snapshot) bool) (supervisor.Snapshot, error) {
	for {
		f.mu.Lock()
		snap, ch := f.snap, f.changed
		f.mu.Unlock()
		if cond(snap) {
			return snap, nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return snap, ctx.Err()
		}
	}
}

func (f *fakePool) Run(ctx context.Context) {
	<-ctx.Done()
	close(f.done)
}

func (f *fakePool) Adopt(context.Context, func(string) bool) (bool, error) {
	f.record("adopt")
	return f.adoptable, nil
}

func (f *fakePool) Ping(ctx context.Context) error {
	f.mu.Lock()
	hung := f.hung
	f.mu.Unlock()
	if hung {
		<-ctx.Done()
		return fmt.Errorf("pool %s: loop hung: %w", f.cfg.ID, ctx.Err())
	}
	return nil
}

func (f *fakePool) Flush() {
	f.mu.Lock()
	on := f.onFlush
	f.mu.Unlock()
	if on != nil {
		on()
	}
	f.record("flush")
}

func (f *fakePool) Start() error {
	f.record("start")
	f.set(func(s *supervisor.Snapshot) { s.State, s.Live = lifecycle.Starting, true })
	return nil
}

func (f *fakePool) Stop(context.Context) error {
	f.record("stop")
	return nil
}

func (f *fakePool) Drain(context.Context, time.Duration) (lifecycle.DrainResult, error) {
	served, err := f.m.Pool(f.cfg.ID)
	f.mu.Lock()
	f.drainedWhileServed = err == nil && served == manager.Pool(f)
	f.mu.Unlock()
	f.record("drain")
	f.set(func(s *supervisor.Snapshot) { s.State, s.Live = lifecycle.Stopped, false })
	return lifecycle.DrainResult{Outcome: lifecycle.Drained}, nil
}

func (f *fakePool) Reload(_ context.Context, ref string, _ time.Duration) (string, error) {
	f.record("reload " + ref)
	if ref == "fail.gguf" {
		return "", fmt.Errorf("fake: reload of %s failed: %w", ref, lifecycle.ErrReloadFailed)
	}
	return ref, nil
}

// Park drains as the pool's parkGate says, then leaves it Idle.
func (f *fakePool) Park(ctx context.Context, deadline time.Duration) (lifecycle.DrainResult, error) {
	f.record(fmt.Sprintf("park %s", deadline))
	// As the supervisor's: a sleeping pool's park waits for its sleep
	// (the gate) and leaves it asleep.
	asleep := f.Snapshot().State == lifecycle.Sleeping
	if !asleep {
		f.set(func(s *supervisor.Snapshot) { s.State = lifecycle.Draining })
	}
	f.mu.Lock()
	gate, err := f.parkGate, f.parkErr
	f.mu.Unlock()
	if err != nil {
		return lifecycle.DrainResult{}, err
	}
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return lifecycle.DrainResult{}, ctx.Err()
		}
	}
	if asleep {
		return lifecycle.DrainResult{Outcome: lifecycle.Drained}, nil
	}
	f.set(func(s *supervisor.Snapshot) { s.State, s.Live = lifecycle.Idle, false })
	return lifecycle.DrainResult{Outcome: lifecycle.Drained}, nil
}

// EnsureReady makes the pool Ready at once.
func (f *fakePool) EnsureReady(context.Context, time.Duration) error {
	f.record("ensure")
	f.set(func(s *supervisor.Snapshot) { s.State, s.Live, s.Ready = lifecycle.Ready, true, true })
	f.mu.Lock()
	hook := f.onReady
	f.mu.Unlock()
	if hook != nil {
		hook()
	}
	return nil
}

func (f *fakePool) ResetBreaker()       {}
func (f *fakePool) AllowRestart() error { return nil }
func (f *fakePool) RestoreIdle() bool   { return false }
func (f *fakePool) KeepIdle(since time.Time) bool {
	// As the supervisor's: a stopped pool on demand goes idle.
	if f.cfg.IdleStop <= 0 || f.cfg.Pin || f.Snapshot().State != lifecycle.Stopped {
		return false
	}
	f.record("keep idle")
	f.set(func(s *supervisor.Snapshot) { s.State, s.IdleSince = lifecycle.Idle, since })
	return true
}
func (f *fakePool) AcquireLease(string) (string, error) { return "", lifecycle.ErrNotReady }
func (f *fakePool) ReleaseLease(string) error           { return lifecycle.ErrNoSuchLease }
func (f *fakePool) ReleaseLeaseAs(string, string) error { return lifecycle.ErrNoSuchLease }
func (f *fakePool) ReleaseOwner(string) int             { return 0 }
func (f *fakePool) XID(uuid string, xid uint64)         { f.record(fmt.Sprintf("xid %d %s", xid, uuid)) }
func (f *fakePool) GPUUnhealthy(uuid, why string)       { f.record("unhealthy " + uuid + ": " + why) }
func (f *fakePool) GPUUsable(uuid string)               { f.record("usable " + uuid) }

func (f *fakePool) did(call string) bool { return slices.Contains(f.Calls(), call) }

// gpuCalls are the XID, hold and release calls the pool got.
func (f *fakePool) gpuCalls() []string {
	return slices.DeleteFunc(f.Calls(), func(c string) bool {
		return !strings.HasPrefix(c, "xid ") && !strings.HasPrefix(c, "unhealthy ") && !strings.HasPrefix(c, "usable ")
	})
}

// syncBuffer is the manager's log: its goroutines log concurrently.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// host is a configuration directory and a manager running its pools on
// fake supervisors; the configuration, inventory, stager and metrics are
// the real ones.
type host struct {
	t     *testing.T
	dir   string
	logs  *syncBuffer
	reg   *prometheus.Registry
	opts  manager.Options
	m     *manager.Manager
	pub   *publisher
	users *users.Table

	mu    sync.Mutex
	built []*fakePool
}

// staticConf is a manager configuration with four GPUs; more adds to
// [Inventory].
func staticConf(dir, more string) string {
	return `[Manager]
StateDir=` + dir + `/state
RuntimeDir=` + dir + `/run
ModelsDir=` + dir + `/models
MetricsTextfile=
[Inventory]
Backend=static
Device=0 GPU-00000000-0000-4000-8000-000000000000 /dev/nvidia0
Device=1 GPU-11111111-1111-4111-8111-111111111111 /dev/nvidia1
Device=2 GPU-22222222-2222-4222-8222-222222222222 /dev/nvidia2
Device=3 GPU-33333333-3333-4333-8333-333333333333 /dev/nvidia3
` + more
}

// The static inventory's GPU UUIDs, by index.
var gpuUUID = []string{"GPU-00000000-0000-4000-8000-000000000000", "GPU-11111111-1111-4111-8111-111111111111",
	"GPU-22222222-2222-4222-8222-222222222222", "GPU-33333333-3333-4333-8333-333333333333"}

// newHost writes the manager configuration conf(dir) and the pools (id:
// "devices[;more lines]").
func newHost(t *testing.T, conf func(dir string) string, pools map[string]string) *host {
	t.Helper()
	dir := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "pools.d"), 0o755))
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "models"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, config.ManagerFile), []byte(conf(dir)), 0o644))
	h := &host{t: t, dir: dir, logs: &syncBuffer{}, reg: prometheus.NewRegistry(), pub: &publisher{}}
	h.writePools(pools)
	return h
}

// writePools makes the pool files exactly those given.
func (h *host) writePools(pools map[string]string) {
	h.t.Helper()
	old, _ := filepath.Glob(filepath.Join(h.dir, "pools.d", "*.pool"))
	for _, f := range old {
		require.NoError(h.t, os.Remove(f))
	}
	for id, spec := range pools {
		devices, more, _ := strings.Cut(spec, ";")
		port := 8000 + int(id[0]) // the same on every write
		require.NoError(h.t, os.WriteFile(filepath.Join(h.dir, "pools.d", id+".pool"),
			testpool.SimPoolFile("/usr/bin/engine", devices, h.dir+"/models/"+id+".gguf", port, strings.ReplaceAll(more, ";", "\n")), 0o644))
	}
}

// load reads the configuration directory.
func (h *host) load() *config.Config {
	h.t.Helper()
	cfg, err := config.Load(h.dir)
	require.NoError(h.t, err)
	return cfg
}

// open runs a manager on the configuration, with lib as the host's NVML
// (nil: the static inventory).
func (h *host) open(lib func() gpu.NVML, tune func(*manager.Options)) *manager.Manager {
	h.t.Helper()
	cfg := h.load()
	var nv gpu.NVML
	if lib != nil {
		nv = lib()
	}
	inv, err := gpu.Load(cfg.Manager.Inventory, nv, "")
	require.NoError(h.t, err)
	// The tests' engines run as the test's own user.
	stager := model.New(cfg.Manager.ModelsDir, filepath.Join(cfg.Manager.StateDir, "staged"), model.WithEngineGroup(uint32(os.Getgid())))
	accounts := users.Open(filepath.Join(cfg.Manager.StateDir, users.File), "", cfg.Manager.EngineUIDs.First, cfg.Manager.EngineUIDs.Last, "")
	h.users = accounts
	h.opts = manager.Options{
		Users:     accounts,
		Log:       slog.New(slog.NewTextHandler(h.logs, nil)),
		Metrics:   metrics.New(h.reg),
		Stager:    stager,
		Inventory: inv,
		NVML:      lib,
		NewPool: func(p *config.Pool) (manager.Pool, error) {
			// The real pool's setup says what it refuses (an unknown GPU).
			if _, err := supervisor.FromPool(p, &cfg.Manager, inv, stager, accounts); err != nil {
				return nil, err
			}
			f := newFakePool(p, h.m)
			h.mu.Lock()
			h.built = append(h.built, f)
			h.mu.Unlock()
			return f, nil
		},
	}
	if tune != nil {
		tune(&h.opts)
	}
	ctx, cancel := context.WithCancel(context.Background())
	m, err := manager.Open(ctx, cfg, h.opts)
	require.NoError(h.t, err)
	h.m = m
	h.mu.Lock()
	for _, f := range h.built {
		f.m = m
	}
	h.mu.Unlock()
	m.SetPublisher(h.pub)
	h.t.Cleanup(func() {
		cancel()
		m.Close()
		if h.t.Failed() {
			h.t.Logf("manager log:\n%s", h.logs.String())
		}
	})
	return m
}

// pool is the fake the manager serves as id now.
func (h *host) pool(id string) *fakePool {
	h.t.Helper()
	p, err := h.m.Pool(id)
	require.NoError(h.t, err)
	return p.(*fakePool)
}

// Built are the fake pools built so far, in order.
func (h *host) Built() []*fakePool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.built)
}

// publisher records what a reload publishes.
type publisher struct {
	mu    sync.Mutex
	calls []string
}

func (p *publisher) PutPool(pool manager.Pool) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.calls = append(p.calls, "put "+pool.Snapshot().ID)
	return nil
}

func (p *publisher) RemovePool(id string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.calls = append(p.calls, "remove "+id)
}

func (p *publisher) Calls() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.calls)
}
