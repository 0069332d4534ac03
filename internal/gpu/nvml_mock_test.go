//go:build linux && cgo

package gpu

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxa100"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh100"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/server"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/gpu/nvmlmock"
)

// shiftedMinors are minors that differ from every index, as on hosts
// where the driver numbered the GPUs in another order than NVML.
var shiftedMinors = []int{3, 4, 5, 6, 7, 0, 1, 2}

// dgxHost is an 8-GPU DGX from go-nvml's mocks with shifted minors and GPU
// 2 in MIG mode with two 1-slice MIG devices.
func dgxHost(t *testing.T, s *server.Server) *nvmlmock.Host {
	t.Helper()
	h := nvmlmock.New(s, shiftedMinors...)
	for range 2 {
		_, err := h.AddMIG(2, nvml.GPU_INSTANCE_PROFILE_1_SLICE)
		require.NoError(t, err)
	}
	return h
}

var dgxServers = []struct {
	name string
	new  func() *server.Server
}{
	{"DGX A100", dgxa100.New},
	{"DGX H100", dgxh100.New},
}

// wantInventory is what the mock host must give: every GPU with its own
// minor's node, each MIG device after its GPU on the parent's node.
func wantInventory(h *nvmlmock.Host) []GPU {
	var out []GPU
	for i := range h.Server.Devices {
		d := h.GPU(i)
		g := GPU{Index: i, UUID: d.UUID, Minor: shiftedMinors[i], Node: fmt.Sprintf("/dev/nvidia%d", shiftedMinors[i]),
			Name: d.Config.Name, MemoryBytes: d.MemoryInfo.Total}
		out = append(out, g)
		for _, m := range h.MIGs(i) {
			name, _ := m.GetName()
			mem, _ := m.GetMemoryInfo()
			out = append(out, GPU{Index: i, UUID: m.UUID, Minor: g.Minor, Node: g.Node, Name: name, MemoryBytes: mem.Total, Parent: d.UUID})
		}
	}
	return out
}

func TestNVMLInventoryFromDGXMocks(t *testing.T) {
	for _, srv := range dgxServers {
		t.Run(srv.name, func(t *testing.T) {
			h := dgxHost(t, srv.new())
			inv, err := Load(config.Inventory{Backend: config.BackendNVML}, NewNVMLWith(h.Server), devRoot(t))
			require.NoError(t, err)
			assert.Equal(t, SourceNVML, inv.Source)
			assert.NoError(t, inv.Fallback)
			require.Equal(t, wantInventory(h), inv.GPUs)
			assert.Equal(t, []string{"/dev/nvidiactl", "/dev/nvidia-uvm"}, inv.Control)
			st := h.Stats()
			assert.Zero(t, st.Open, "NVML shut down after the inventory")
			assert.Zero(t, st.EventSets, "an inventory watches nothing")

			g2, migs := h.GPU(2), h.MIGs(2)
			require.Len(t, migs, 2)
			tests := []struct {
				name      string
				devices   []string
				wantUUIDs []string
				wantNodes []string
			}{
				{name: "by index: the node is the minor's, not the index's", devices: []string{"0"},
					wantUUIDs: []string{h.GPU(0).UUID}, wantNodes: []string{"/dev/nvidia3"}},
				{name: "by UUID", devices: []string{h.GPU(5).UUID},
					wantUUIDs: []string{h.GPU(5).UUID}, wantNodes: []string{"/dev/nvidia0"}},
				{name: "by MIG UUID: the parent's node, the MIG device's UUID", devices: []string{migs[1].UUID},
					wantUUIDs: []string{migs[1].UUID}, wantNodes: []string{"/dev/nvidia5"}},
				{name: "legacy MIG-GPU-<uuid>/<gi>/<ci>",
					devices:   []string{fmt.Sprintf("MIG-%s/%d/%d", g2.UUID, migs[0].GPUInstance, migs[0].ComputeInstance)},
					wantUUIDs: []string{migs[0].UUID}, wantNodes: []string{"/dev/nvidia5"}},
				{name: "two MIG devices of one GPU open its node once", devices: []string{migs[0].UUID, migs[1].UUID, "7"},
					wantUUIDs: []string{migs[0].UUID, migs[1].UUID, h.GPU(7).UUID}, wantNodes: []string{"/dev/nvidia5", "/dev/nvidia2"}},
			}
			for _, tt := range tests {
				t.Run(tt.name, func(t *testing.T) {
					gpus, err := inv.Resolve(tt.devices)
					require.NoError(t, err)
					var uuids []string
					for _, g := range gpus {
						uuids = append(uuids, g.UUID)
					}
					assert.Equal(t, tt.wantUUIDs, uuids)
					assert.Equal(t, append(tt.wantNodes, inv.Control...), inv.DeviceNodes(gpus))
				})
			}
			_, err = inv.Resolve([]string{"8"})
			assert.ErrorContains(t, err, `GPU "8" is not on this host: NVML reports 0 `+h.GPU(0).UUID+` (/dev/nvidia3)`)
		})
	}
}

// Backend=auto runs without NVML when it does not load, whatever the
// reason; Backend=nvml refuses to; nothing past the failed Init reaches
// the library (go-nvml would kill the process on an unloaded symbol).
func TestNVMLThatDoesNotLoad(t *testing.T) {
	tests := []struct {
		name       string
		backend    config.Backend
		initRet    nvml.Return
		wantSource string
		wantErr    string // in the error, or Fallback for auto
		wantNoLib  bool
	}{
		{name: "auto without libnvidia-ml: static", backend: config.BackendAuto, initRet: nvml.ERROR_LIBRARY_NOT_FOUND,
			wantSource: SourceStatic, wantErr: "[Inventory] Backend=auto could not use NVML: NVML: libnvidia-ml.so.1 not found", wantNoLib: true},
		{name: "auto without the kernel module: static", backend: config.BackendAuto, initRet: nvml.ERROR_DRIVER_NOT_LOADED,
			wantSource: SourceStatic, wantErr: "[Inventory] Backend=auto could not use NVML: NVML: Init: ERROR_DRIVER_NOT_LOADED"},
		{name: "auto with a library of another driver: static", backend: config.BackendAuto, initRet: nvml.ERROR_LIB_RM_VERSION_MISMATCH,
			wantSource: SourceStatic, wantErr: "ERROR_LIB_RM_VERSION_MISMATCH"},
		{name: "nvml without libnvidia-ml: an error saying what to do", backend: config.BackendNVML, initRet: nvml.ERROR_LIBRARY_NOT_FOUND,
			wantErr: "GPU inventory ([Inventory] Backend=nvml): NVML: libnvidia-ml.so.1 not found (is the NVIDIA driver installed?); use [Inventory] Backend=static", wantNoLib: true},
		{name: "nvml without the kernel module", backend: config.BackendNVML, initRet: nvml.ERROR_DRIVER_NOT_LOADED,
			wantErr: "GPU inventory ([Inventory] Backend=nvml): NVML: Init: ERROR_DRIVER_NOT_LOADED"},
		{name: "static never loads NVML", backend: config.BackendStatic, initRet: nvml.SUCCESS, wantSource: SourceStatic},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := nvmlmock.New(dgxh100.New())
			h.FailInit(tt.initRet)
			inv, err := Load(withBackend(staticCfg, tt.backend), NewNVMLWith(h.Server), devRoot(t))

			assert.Empty(t, h.Server.DeviceGetCountCalls(), "nothing past Init")
			assert.Empty(t, h.Server.DeviceGetHandleByIndexCalls())
			assert.Zero(t, h.Stats().Open)
			if tt.backend == config.BackendStatic {
				assert.Empty(t, h.Server.InitCalls())
			} else {
				assert.Len(t, h.Server.InitCalls(), 1)
			}
			if tt.wantSource == "" {
				require.Error(t, err)
				assert.Nil(t, inv)
				assert.ErrorContains(t, err, tt.wantErr)
				assert.Equal(t, tt.wantNoLib, isNoLib(err))
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.wantSource, inv.Source)
			assert.Equal(t, staticGPUs, inv.GPUs)
			if tt.wantErr == "" {
				assert.NoError(t, inv.Fallback)
				return
			}
			require.Error(t, inv.Fallback)
			assert.ErrorContains(t, inv.Fallback, tt.wantErr)
			assert.Equal(t, tt.wantNoLib, isNoLib(inv.Fallback))
		})
	}
}

func isNoLib(err error) bool { return errors.Is(err, ErrNoLibrary) }

// Every adapter call before a successful Init is refused by the adapter
// itself: the mock records none of them.
func TestNVMLCallsBeforeInitNeverReachTheLibrary(t *testing.T) {
	h := nvmlmock.New(dgxa100.New())
	h.FailInit(nvml.ERROR_LIBRARY_NOT_FOUND)
	lib := NewNVMLWith(h.Server)
	require.ErrorIs(t, lib.Init(), ErrNoLibrary)

	calls := []struct {
		name string
		call func() error
	}{
		{"DeviceCount", func() error { _, err := lib.DeviceCount(); return err }},
		{"DeviceByIndex", func() error { _, err := lib.DeviceByIndex(0); return err }},
		{"DeviceByUUID", func() error { _, err := lib.DeviceByUUID(h.GPU(0).UUID); return err }},
		{"NewEventSet", func() error { _, err := lib.NewEventSet(); return err }},
		{"Shutdown", lib.Shutdown},
		{"WatchXID", func() error {
			return WatchXID(context.Background(), lib, []string{h.GPU(0).UUID}, func(string, uint64) { t.Error("callback") })
		}},
	}
	for _, c := range calls {
		t.Run(c.name, func(t *testing.T) {
			assert.Error(t, c.call())
		})
	}
	assert.Len(t, h.Server.InitCalls(), 2, "the failed Init and WatchXID's")
	assert.Empty(t, h.Server.DeviceGetCountCalls())
	assert.Empty(t, h.Server.DeviceGetHandleByIndexCalls())
	assert.Empty(t, h.Server.DeviceGetHandleByUUIDCalls())
	assert.Empty(t, h.Server.EventSetCreateCalls())
	assert.Empty(t, h.Server.ShutdownCalls())
}

// NVML failing half-way through the inventory: the load fails naming the
// GPU and what NVML said; a GPU that cannot name itself is still used;
// a GPU without MIG support has no MIG devices.
func TestNVMLInventoryErrors(t *testing.T) {
	tests := []struct {
		name    string
		fault   func(h *nvmlmock.Host)
		wantErr string
		check   func(t *testing.T, h *nvmlmock.Host, inv *Inventory)
	}{
		{name: "device count", wantErr: "GPU inventory from NVML: NVML: device count: ERROR_UNKNOWN",
			fault: func(h *nvmlmock.Host) {
				h.Server.DeviceGetCountFunc = func() (int, nvml.Return) { return 0, nvml.ERROR_UNKNOWN }
			}},
		{name: "a lost GPU", wantErr: "GPU inventory from NVML: GPU 4: NVML: device 4: ERROR_GPU_IS_LOST",
			fault: func(h *nvmlmock.Host) {
				all := h.Server.DeviceGetHandleByIndexFunc
				h.Server.DeviceGetHandleByIndexFunc = func(i int) (nvml.Device, nvml.Return) {
					if i == 4 {
						return nil, nvml.ERROR_GPU_IS_LOST
					}
					return all(i)
				}
			}},
		{name: "UUID", wantErr: "GPU 1: UUID: NVML: UUID: ERROR_NO_PERMISSION",
			fault: func(h *nvmlmock.Host) {
				h.GPU(1).GetUUIDFunc = func() (string, nvml.Return) { return "", nvml.ERROR_NO_PERMISSION }
			}},
		{name: "minor: never guessed from the index", wantErr: "minor number: NVML: minor number: ERROR_NOT_SUPPORTED",
			fault: func(h *nvmlmock.Host) {
				h.GPU(3).GetMinorNumberFunc = func() (int, nvml.Return) { return 0, nvml.ERROR_NOT_SUPPORTED }
			}},
		{name: "MIG mode", wantErr: "): MIG devices: NVML: MIG mode: ERROR_UNKNOWN",
			fault: func(h *nvmlmock.Host) {
				h.GPU(2).GetMigModeFunc = func() (int, int, nvml.Return) { return 0, 0, nvml.ERROR_UNKNOWN }
			}},
		{name: "MIG device count", wantErr: "MIG devices: NVML: MIG device count: ERROR_UNKNOWN",
			fault: func(h *nvmlmock.Host) {
				h.GPU(2).GetMaxMigDeviceCountFunc = func() (int, nvml.Return) { return 0, nvml.ERROR_UNKNOWN }
			}},
		{name: "MIG device handle", wantErr: "MIG devices: NVML: MIG device 0: ERROR_GPU_IS_LOST",
			fault: func(h *nvmlmock.Host) {
				h.GPU(2).GetMigDeviceHandleByIndexFunc = func(int) (nvml.Device, nvml.Return) { return nil, nvml.ERROR_GPU_IS_LOST }
			}},
		{name: "MIG device UUID", wantErr: "MIG device UUID: NVML: UUID: ERROR_UNKNOWN",
			fault: func(h *nvmlmock.Host) {
				h.MIGs(2)[1].GetUUIDFunc = func() (string, nvml.Return) { return "", nvml.ERROR_UNKNOWN }
			}},
		{name: "GPU without MIG support", fault: func(h *nvmlmock.Host) {
			h.GPU(2).GetMigModeFunc = func() (int, int, nvml.Return) { return 0, 0, nvml.ERROR_NOT_SUPPORTED }
		}, check: func(t *testing.T, h *nvmlmock.Host, inv *Inventory) {
			assert.Len(t, inv.GPUs, 8, "no MIG devices")
		}},
		{name: "name and memory are for people: the GPU is still used", fault: func(h *nvmlmock.Host) {
			h.GPU(6).GetNameFunc = func() (string, nvml.Return) { return "", nvml.ERROR_UNKNOWN }
			h.GPU(6).GetMemoryInfoFunc = func() (nvml.Memory, nvml.Return) { return nvml.Memory{}, nvml.ERROR_UNKNOWN }
		}, check: func(t *testing.T, h *nvmlmock.Host, inv *Inventory) {
			g, err := inv.Resolve([]string{"6"})
			require.NoError(t, err)
			assert.Equal(t, []GPU{{Index: 6, UUID: h.GPU(6).UUID, Minor: 1, Node: "/dev/nvidia1"}}, g)
		}},
		{name: "a MIG device's GPU and compute instance ids are only for legacy names", fault: func(h *nvmlmock.Host) {
			h.MIGs(2)[0].GetGpuInstanceIdFunc = func() (int, nvml.Return) { return 0, nvml.ERROR_UNKNOWN }
		}, check: func(t *testing.T, h *nvmlmock.Host, inv *Inventory) {
			m := h.MIGs(2)[0]
			_, err := inv.Resolve([]string{m.UUID})
			assert.NoError(t, err)
			_, err = inv.Resolve([]string{fmt.Sprintf("MIG-%s/%d/%d", h.GPU(2).UUID, m.GPUInstance, m.ComputeInstance)})
			assert.ErrorContains(t, err, "is not on this host")
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := dgxHost(t, dgxa100.New())
			tt.fault(h)
			inv, err := Load(config.Inventory{Backend: config.BackendAuto}, NewNVMLWith(h.Server), devRoot(t))
			assert.Zero(t, h.Stats().Open, "NVML shut down also on failure")
			if tt.wantErr != "" {
				require.Error(t, err)
				assert.ErrorContains(t, err, tt.wantErr)
				assert.Nil(t, inv)
				return
			}
			require.NoError(t, err)
			tt.check(t, h, inv)
		})
	}
}

type watched struct {
	uuid string
	xid  uint64
}

// XID events through the adapter reach the watched GPU or MIG device and
// nothing else; events are registered on GPUs, once each.
func TestNVMLXIDReachesOnlyTheWatchedDevice(t *testing.T) {
	h := dgxHost(t, dgxa100.New())
	g0, g2, migs := h.GPU(0), h.GPU(2), h.MIGs(2)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	got := make(chan watched, 10)
	done := make(chan error, 1)
	go func() {
		done <- WatchXID(ctx, NewNVMLWith(h.Server), []string{g0.UUID, migs[1].UUID},
			func(u string, x uint64) { got <- watched{u, x} })
	}()
	whole := ^uint32(0)
	// The sentinel: an event on GPU 0 that is always reported, so an
	// event before it that reports nothing is seen to report nothing.
	sentinel := func(t *testing.T) {
		t.Helper()
		require.NoError(t, h.XID(0, 999, whole, whole))
		select {
		case w := <-got:
			assert.Equal(t, watched{g0.UUID, 999}, w, "only the sentinel")
		case <-time.After(5 * time.Second):
			t.Fatal("no callback for the sentinel")
		}
	}

	tests := []struct {
		name string
		gpu  int
		xid  uint64
		gi   uint32
		ci   uint32
		want []watched
	}{
		{name: "whole GPU 0", gpu: 0, xid: 79, gi: whole, ci: whole, want: []watched{{g0.UUID, 79}}},
		{name: "the watched MIG device's instance", gpu: 2, xid: 43, gi: uint32(migs[1].GPUInstance), ci: uint32(migs[1].ComputeInstance),
			want: []watched{{migs[1].UUID, 43}}},
		{name: "its GPU instance, any compute instance", gpu: 2, xid: 45, gi: uint32(migs[1].GPUInstance), ci: whole,
			want: []watched{{migs[1].UUID, 45}}},
		{name: "the unwatched MIG device on the same GPU", gpu: 2, xid: 43, gi: uint32(migs[0].GPUInstance), ci: uint32(migs[0].ComputeInstance)},
		{name: "the whole parent GPU reaches its watched MIG device", gpu: 2, xid: 48, gi: whole, ci: whole,
			want: []watched{{migs[1].UUID, 48}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			require.NoError(t, h.XID(tt.gpu, tt.xid, tt.gi, tt.ci))
			var ws []watched
			for range tt.want {
				select {
				case w := <-got:
					ws = append(ws, w)
				case <-time.After(5 * time.Second):
					t.Fatalf("no callback; got %v of %v", ws, tt.want)
				}
			}
			assert.ElementsMatch(t, tt.want, ws)
			sentinel(t)
		})
	}
	t.Run("a GPU nobody watches is never registered, so NVML never reports it", func(t *testing.T) {
		before := h.Stats().Dropped
		require.NoError(t, h.XID(5, 79, whole, whole))
		assert.Equal(t, before+1, h.Stats().Dropped)
		sentinel(t)
	})

	st := h.Stats()
	assert.Equal(t, []string{g0.UUID, g2.UUID}, st.Registered, "registered on GPUs, a MIG device through its parent")
	regs := g2.RegisterEventsCalls()
	require.Len(t, regs, 1)
	assert.Equal(t, uint64(nvml.EventTypeXidCriticalError), regs[0].V, "XID events only")
	assert.Empty(t, migs[1].RegisterEventsCalls(), "never on a MIG handle")

	cancel()
	select {
	case err := <-done:
		assert.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("cancel does not end the watcher")
	}
	st = h.Stats()
	assert.Zero(t, st.Open, "NVML shut down")
	assert.Equal(t, st.EventSets, st.Freed, "event sets freed")
}

// Wait failing with anything but a timeout: the watch reports it, frees
// what it holds and tries again after the retry interval, neither
// spinning nor giving up; once NVML answers again, XIDs flow.
func TestNVMLWaitErrorsAreReportedAndRetried(t *testing.T) {
	for _, ret := range []nvml.Return{nvml.ERROR_GPU_IS_LOST, nvml.ERROR_UNKNOWN, nvml.ERROR_UNINITIALIZED} {
		t.Run(ret.Error(), func(t *testing.T) {
			h := nvmlmock.New(dgxh100.New(), shiftedMinors...)
			g1 := h.GPU(1).UUID
			ctx, cancel := context.WithCancel(context.Background())
			got := make(chan watched, 10)
			failures := make(chan error, 1000)
			done := make(chan struct{})
			const retry = 100 * time.Millisecond
			go func() {
				defer close(done)
				KeepWatchingXID(ctx, NewNVMLWith(h.Server), func() []string { return []string{g1} }, nil, retry,
					func(u string, x uint64) { got <- watched{u, x} }, func(err error) { failures <- err })
			}()
			defer func() {
				cancel()
				select {
				case <-done:
				case <-time.After(5 * time.Second):
					t.Error("cancel does not end the watch")
				}
				st := h.Stats()
				assert.Zero(t, st.Open, "every Init shut down")
				assert.Equal(t, st.EventSets, st.Freed, "every event set freed")
			}()
			expect := func() {
				t.Helper()
				require.NoError(t, h.XID(1, 79, ^uint32(0), ^uint32(0)))
				select {
				case w := <-got:
					assert.Equal(t, watched{g1, 79}, w)
				case <-time.After(5 * time.Second):
					t.Fatal("no callback")
				}
			}
			expect()
			assert.Empty(t, failures, "a timeout is no failure")

			h.FailWait(ret)
			select {
			case err := <-failures:
				assert.ErrorContains(t, err, "XID events: NVML: wait for events: "+ret.Error())
			case <-time.After(5 * time.Second):
				t.Fatal("the failure is not reported")
			}
			inits := h.Stats().Inits
			time.Sleep(5 * retry)
			st := h.Stats()
			assert.LessOrEqual(t, st.Inits-inits, 7, "tried again about every %v, not in a loop", retry)
			assert.GreaterOrEqual(t, len(failures), 2, "tried again, and each failure reported")
			assert.LessOrEqual(t, st.EventSets-st.Freed, 1, "no event set leaks between tries")

			h.FailWait(nvml.SUCCESS)
			expect()
		})
	}
}

// An XID 79 comes from a GPU that has fallen off the bus and no longer
// answers GetUUID: it still reaches its pools, by the UUID the GPU had
// when it was registered.
func TestAnXIDFromALostGPUKeepsItsUUID(t *testing.T) {
	h := nvmlmock.New(dgxh100.New())
	n := NewNVMLWith(h.Server)
	require.NoError(t, n.Init())
	defer n.Shutdown()
	uuid := h.GPU(1).UUID
	d, err := n.DeviceByUUID(uuid)
	require.NoError(t, err)
	es, err := n.NewEventSet()
	require.NoError(t, err)
	defer es.Free()
	require.NoError(t, es.RegisterXID(d))
	h.SetHealth(1, nvmlmock.Health{Lost: true})
	sent := make(chan error, 1)
	go func() { sent <- h.XID(1, 79, NoInstance, NoInstance) }()
	ev, err := es.Wait(5 * time.Second)
	require.NoError(t, <-sent)
	require.NoError(t, err)
	require.NotNil(t, ev)
	assert.Equal(t, uuid, ev.UUID)
	assert.Equal(t, uint64(79), ev.XID)
}

// A kernel XID line names its GPU by PCI address; NVML gives its UUID.
func TestKernelXIDNamesItsGPUByPCI(t *testing.T) {
	h := nvmlmock.New(dgxh100.New())
	k, ok := ParseKernelXID("NVRM: Xid (PCI:0000:03:00): 31, pid=1, name=x, Ch 1")
	require.True(t, ok)
	uuid, err := UUIDByPCI(NewNVMLWith(h.Server), k.PCI)
	require.NoError(t, err)
	assert.Equal(t, h.GPU(3).UUID, uuid)
	_, err = UUIDByPCI(NewNVMLWith(h.Server), "0000:99:00.0")
	assert.ErrorContains(t, err, "device at PCI 0000:99:00.0")
	assert.Zero(t, h.Stats().Open, "NVML shut down after each")
}
