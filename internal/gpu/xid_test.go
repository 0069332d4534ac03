package gpu

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

type xid struct {
	uuid string
	xid  uint64
}

func TestWatchXID(t *testing.T) {
	f := newFake()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	got := make(chan xid, 10)
	done := make(chan error, 1)
	go func() {
		done <- WatchXID(ctx, f, []string{uuidA, uuidMIG}, func(u string, x uint64) { got <- xid{u, x} })
	}()

	tests := []struct {
		name string
		ev   Event
		want []xid
	}{
		{name: "whole GPU", ev: Event{UUID: uuidA, XID: 79, GPUInstance: NoInstance, ComputeInstance: NoInstance}, want: []xid{{uuidA, 79}}},
		{name: "the MIG device's instance", ev: Event{UUID: uuidB, XID: 43, GPUInstance: 1, ComputeInstance: 0}, want: []xid{{uuidMIG, 43}}},
		{name: "another instance on the same GPU", ev: Event{UUID: uuidB, XID: 43, GPUInstance: 2, ComputeInstance: 0}},
		{name: "whole parent GPU reaches its MIG device", ev: Event{UUID: uuidB, XID: 48, GPUInstance: NoInstance, ComputeInstance: NoInstance}, want: []xid{{uuidMIG, 48}}},
		{name: "a GPU nobody watches", ev: Event{UUID: "GPU-8f2c1a70-0000-4000-8000-0000000000ff", XID: 79, GPUInstance: NoInstance}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			select {
			case f.events <- tt.ev:
			case err := <-done:
				t.Fatalf("watcher ended: %v", err)
			case <-time.After(5 * time.Second):
				t.Fatal("watcher does not take events")
			}
			for _, w := range tt.want {
				select {
				case g := <-got:
					assert.Equal(t, w, g)
				case <-time.After(5 * time.Second):
					t.Fatalf("no callback for %v", w)
				}
			}
			// The next event is taken only after this one was handled.
			f.events <- Event{UUID: "GPU-8f2c1a70-0000-4000-8000-0000000000ee"}
			assert.Empty(t, got)
		})
	}

	f.mu.Lock()
	assert.Equal(t, []string{uuidA, uuidB}, f.registered, "events registered on GPUs, once each, MIG through its parent")
	f.mu.Unlock()

	cancel()
	select {
	case err := <-done:
		assert.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("cancel does not end the watcher")
	}
	assert.Zero(t, f.open, "Init shut down")
}

func TestWatchXIDFailsAtOnce(t *testing.T) {
	tests := []struct {
		name    string
		lib     *fakeNVML
		uuids   []string
		wantErr string
	}{
		{name: "no NVML", lib: missingLib(), uuids: []string{uuidA}, wantErr: "libnvidia-ml.so.1 not found"},
		{name: "unknown GPU", lib: newFake(), uuids: []string{"GPU-8f2c1a70-0000-4000-8000-0000000000ff"},
			wantErr: "XID events for GPU-8f2c1a70-0000-4000-8000-0000000000ff"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			err := WatchXID(ctx, tt.lib, tt.uuids, func(string, uint64) { t.Error("callback") })
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.wantErr)
			assert.NoError(t, ctx.Err(), "returned before the context ended")
			assert.Zero(t, tt.lib.open)
		})
	}
}

// The daemon passes no NVML of its own: the host's is used, and a host
// without one is an error, not a crash.
func TestWatchXIDWithTheHostsNVML(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := WatchXID(ctx, nil, []string{"GPU-8f2c1a70-0000-4000-8000-0000000000ff"}, func(string, uint64) { t.Error("callback") })
	require.Error(t, err, "this host has no such GPU")
	assert.NoError(t, ctx.Err())
}

// The watch goes on: after NVML fails it is tried again, and a reload that
// changes the pools' GPUs changes what is watched.
func TestKeepWatchingXID(t *testing.T) {
	f := newFake()
	ctx, cancel := context.WithCancel(context.Background())
	var mu sync.Mutex
	set := []string{uuidA}
	uuids := func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), set...)
	}
	changed := make(chan struct{}, 1)
	got := make(chan xid, 10)
	failures := make(chan error, 10)
	done := make(chan struct{})
	go func() {
		defer close(done)
		KeepWatchingXID(ctx, f, uuids, changed, 20*time.Millisecond,
			func(u string, x uint64) { got <- xid{u, x} }, func(err error) { failures <- err })
	}()
	expect := func(ev Event, want xid) {
		t.Helper()
		select {
		case f.events <- ev:
		case <-time.After(5 * time.Second):
			t.Fatal("nobody takes events")
		}
		select {
		case g := <-got:
			assert.Equal(t, want, g)
		case <-time.After(5 * time.Second):
			t.Fatalf("no callback for %v", want)
		}
	}
	expect(Event{UUID: uuidA, XID: 79, GPUInstance: NoInstance, ComputeInstance: NoInstance}, xid{uuidA, 79})

	f.mu.Lock()
	f.waitErr = errors.New("ERROR_GPU_IS_LOST")
	f.mu.Unlock()
	select {
	case err := <-failures:
		assert.ErrorContains(t, err, "ERROR_GPU_IS_LOST")
	case <-time.After(5 * time.Second):
		t.Fatal("the failure is not reported")
	}
	expect(Event{UUID: uuidA, XID: 48, GPUInstance: NoInstance, ComputeInstance: NoInstance}, xid{uuidA, 48})

	mu.Lock()
	set = []string{uuidA, uuidMIG}
	mu.Unlock()
	changed <- struct{}{}
	require.Eventually(t, func() bool {
		f.mu.Lock()
		defer f.mu.Unlock()
		return slices.Contains(f.registered, uuidB)
	}, 5*time.Second, 5*time.Millisecond, "the reloaded pools' GPUs are watched")
	expect(Event{UUID: uuidB, XID: 43, GPUInstance: 1, ComputeInstance: 0}, xid{uuidMIG, 43})

	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("cancel does not end the watch")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	assert.Zero(t, f.open, "every Init shut down")
	assert.GreaterOrEqual(t, f.inits, 3, "watched again after the failure and after the reload")
}
