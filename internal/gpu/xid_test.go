package gpu

import (
	"context"
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
