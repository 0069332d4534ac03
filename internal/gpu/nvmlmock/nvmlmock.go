//go:build linux && cgo

// Package nvmlmock is a GPU host for tests of the NVML path: go-nvml's own
// mock servers (pkg/nvml/mock/dgxa100, dgxh100) with what they leave out
// filled in the way the driver behaves: MIG device handles, XID events on
// event sets, load failures and failing waits, lost GPUs and pending
// resets (SetHealth), running compute processes (RunCompute). Any NVML call it does not
// model panics in go-nvml's mock, so a new call in the adapter cannot go
// untested by accident.
package nvmlmock

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/server"
)

// maxMIG is what NVML reports as GetMaxMigDeviceCount on A100 and H100.
const maxMIG = 7

// Host is one machine's NVML. Server is the nvml.Interface to hand to
// the adapter.
type Host struct {
	Server *server.Server

	mu      sync.Mutex
	initRet nvml.Return
	waitRet nvml.Return // every Wait fails with it while not SUCCESS
	open    int         // Inits not yet shut down
	inits   int
	migs    map[*server.Device][]*MIG // by slot; nil slots are empty
	sets    []*eventSet
	events  chan delivery
	dropped int
	freed   int
	health  map[*server.Device]Health
	procs   map[*server.Device][]nvml.ProcessInfo
}

// Health is what NVML reports about a GPU's state. The zero Health is a
// good GPU on which every query is supported.
type Health struct {
	// Lost makes the GPU, its MIG devices and the handle lookups for
	// them answer ERROR_GPU_IS_LOST, as after XID 79.
	Lost bool
	// RecoveryAction is the driver's FI_DEV_GET_GPU_RECOVERY_ACTION.
	RecoveryAction nvml.DeviceGpuRecoveryAction
	// RemapPending and RemapFailed are GetRemappedRows' pending and
	// failure flags.
	RemapPending, RemapFailed bool
	// RetiredPagesPending is GetRetiredPagesPendingStatus.
	RetiredPagesPending bool
	// The No... fields make a query answer ERROR_NOT_SUPPORTED, as on
	// drivers before R550 (recovery action), GPUs before Ampere (row
	// remapping) and Ampere and newer (page retirement).
	NoRecoveryAction, NoRowRemapping, NoPageRetirement bool
}

// MIG is one MIG device: a compute instance of a GPU instance.
type MIG struct {
	*mock.Device
	UUID                         string
	Parent                       *server.Device
	GPUInstance, ComputeInstance int
}

// New wraps a go-nvml mock server, e.g. dgxa100.New(); minors are the
// GPUs' minor numbers, which the driver does not tie to the NVML index
// (GPUs beyond the list keep the mock's, equal to the index).
func New(s *server.Server, minors ...int) *Host {
	h := &Host{Server: s, migs: map[*server.Device][]*MIG{}, events: make(chan delivery),
		health: map[*server.Device]Health{}, procs: map[*server.Device][]nvml.ProcessInfo{}}
	for i, m := range minors {
		h.GPU(i).Minor = m
	}
	s.InitFunc = func() nvml.Return {
		h.mu.Lock()
		defer h.mu.Unlock()
		if h.initRet != nvml.SUCCESS {
			return h.initRet
		}
		h.open++
		h.inits++
		return nvml.SUCCESS
	}
	s.ShutdownFunc = func() nvml.Return {
		h.mu.Lock()
		defer h.mu.Unlock()
		if h.open == 0 {
			return nvml.ERROR_UNINITIALIZED
		}
		h.open--
		return nvml.SUCCESS
	}
	// NVML finds MIG devices by their UUID too; an unknown UUID is
	// ERROR_NOT_FOUND.
	s.DeviceGetHandleByUUIDFunc = func(u string) (nvml.Device, nvml.Return) {
		h.mu.Lock()
		defer h.mu.Unlock()
		for _, d := range s.Devices {
			if sd := d.(*server.Device); sd.UUID == u {
				if h.health[sd].Lost {
					return nil, nvml.ERROR_GPU_IS_LOST
				}
				return d, nvml.SUCCESS
			}
		}
		for _, slots := range h.migs {
			for _, m := range slots {
				if m != nil && m.UUID == u {
					if h.health[m.Parent].Lost {
						return nil, nvml.ERROR_GPU_IS_LOST
					}
					return m, nvml.SUCCESS
				}
			}
		}
		return nil, nvml.ERROR_NOT_FOUND
	}
	byIndex := s.DeviceGetHandleByIndexFunc
	s.DeviceGetHandleByIndexFunc = func(i int) (nvml.Device, nvml.Return) {
		d, ret := byIndex(i)
		if ret == nvml.SUCCESS && h.lost(d.(*server.Device)) {
			return nil, nvml.ERROR_GPU_IS_LOST
		}
		return d, ret
	}
	s.EventSetCreateFunc = func() (nvml.EventSet, nvml.Return) {
		es := &eventSet{h: h, registered: map[nvml.Device]bool{}}
		es.WaitFunc = es.wait
		es.FreeFunc = es.free
		h.mu.Lock()
		h.sets = append(h.sets, es)
		h.mu.Unlock()
		return es, nvml.SUCCESS
	}
	for _, d := range s.Devices {
		h.gpuFuncs(d.(*server.Device))
	}
	return h
}

// GPU is the GPU at an NVML index.
func (h *Host) GPU(i int) *server.Device { return h.Server.Devices[i].(*server.Device) }

func (h *Host) lost(d *server.Device) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.health[d].Lost
}

// SetHealth sets what GPU i reports from now on.
func (h *Host) SetHealth(i int, s Health) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.health[h.GPU(i)] = s
}

// RunCompute makes NVML report pid running compute work on GPU i, or on
// its MIG device m when m is not nil, until StopCompute; it uses 1 GiB of
// the device's memory.
func (h *Host) RunCompute(i int, m *MIG, pid int) { h.RunComputeMemory(i, m, pid, 1<<30) }

// RunComputeMemory is RunCompute with the bytes the process uses, which
// the device's free memory (GetMemoryInfo) no longer has.
func (h *Host) RunComputeMemory(i int, m *MIG, pid int, used uint64) {
	p := nvml.ProcessInfo{Pid: uint32(pid), UsedGpuMemory: used, GpuInstanceId: ^uint32(0), ComputeInstanceId: ^uint32(0)}
	if m != nil {
		p.GpuInstanceId, p.ComputeInstanceId = uint32(m.GPUInstance), uint32(m.ComputeInstance)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	d := h.GPU(i)
	h.procs[d] = append(h.procs[d], p)
}

// StopCompute ends every process pid on GPU i.
func (h *Host) StopCompute(i, pid int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d := h.GPU(i)
	h.procs[d] = slices.DeleteFunc(h.procs[d], func(p nvml.ProcessInfo) bool { return p.Pid == uint32(pid) })
}

// computeProcs are GPU d's processes, those of one MIG device when mig.
func (h *Host) computeProcs(d *server.Device, mig bool, gi, ci int) ([]nvml.ProcessInfo, nvml.Return) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.health[d].Lost {
		return nil, nvml.ERROR_GPU_IS_LOST
	}
	var out []nvml.ProcessInfo
	for _, p := range h.procs[d] {
		if !mig || p.GpuInstanceId == uint32(gi) && p.ComputeInstanceId == uint32(ci) {
			out = append(out, p)
		}
	}
	return out, nvml.SUCCESS
}

// used is a device's memory of total bytes with procs on it.
func used(total uint64, procs []nvml.ProcessInfo) nvml.Memory {
	var n uint64
	for _, p := range procs {
		n += p.UsedGpuMemory
	}
	n = min(n, total)
	return nvml.Memory{Total: total, Used: n, Free: total - n}
}

func (h *Host) gpuFuncs(d *server.Device) {
	// What a lost GPU still answers from the mock's own data is lost.
	uuid, mem, name, minor := d.GetUUIDFunc, d.GetMemoryInfoFunc, d.GetNameFunc, d.GetMinorNumberFunc
	d.GetUUIDFunc = func() (string, nvml.Return) {
		if h.lost(d) {
			return "", nvml.ERROR_GPU_IS_LOST
		}
		return uuid()
	}
	d.GetMemoryInfoFunc = func() (nvml.Memory, nvml.Return) {
		if h.lost(d) {
			return nvml.Memory{}, nvml.ERROR_GPU_IS_LOST
		}
		m, ret := mem()
		if ret != nvml.SUCCESS {
			return m, ret
		}
		// What the processes use is not free (the mock's own Free is 0).
		procs, _ := h.computeProcs(d, false, 0, 0)
		return used(m.Total, procs), nvml.SUCCESS
	}
	d.GetNameFunc = func() (string, nvml.Return) {
		if h.lost(d) {
			return "", nvml.ERROR_GPU_IS_LOST
		}
		return name()
	}
	d.GetMinorNumberFunc = func() (int, nvml.Return) {
		if h.lost(d) {
			return 0, nvml.ERROR_GPU_IS_LOST
		}
		return minor()
	}
	d.GetComputeRunningProcessesFunc = func() ([]nvml.ProcessInfo, nvml.Return) { return h.computeProcs(d, false, 0, 0) }
	d.GetFieldValuesFunc = func(values []nvml.FieldValue) nvml.Return {
		h.mu.Lock()
		st := h.health[d]
		h.mu.Unlock()
		if st.Lost {
			return nvml.ERROR_GPU_IS_LOST
		}
		for i := range values {
			v := &values[i]
			if v.FieldId != nvml.FI_DEV_GET_GPU_RECOVERY_ACTION || st.NoRecoveryAction {
				v.NvmlReturn = uint32(nvml.ERROR_NOT_SUPPORTED)
				continue
			}
			v.ValueType = uint32(nvml.VALUE_TYPE_UNSIGNED_INT)
			v.Value = [8]byte{}
			binary.NativeEndian.PutUint32(v.Value[:4], uint32(st.RecoveryAction))
			v.NvmlReturn = uint32(nvml.SUCCESS)
		}
		return nvml.SUCCESS
	}
	d.GetRemappedRowsFunc = func() (int, int, bool, bool, nvml.Return) {
		h.mu.Lock()
		defer h.mu.Unlock()
		switch st := h.health[d]; {
		case st.Lost:
			return 0, 0, false, false, nvml.ERROR_GPU_IS_LOST
		case st.NoRowRemapping:
			return 0, 0, false, false, nvml.ERROR_NOT_SUPPORTED
		default:
			return 0, 0, st.RemapPending, st.RemapFailed, nvml.SUCCESS
		}
	}
	d.GetRetiredPagesPendingStatusFunc = func() (nvml.EnableState, nvml.Return) {
		h.mu.Lock()
		defer h.mu.Unlock()
		switch st := h.health[d]; {
		case st.Lost:
			return nvml.FEATURE_DISABLED, nvml.ERROR_GPU_IS_LOST
		case st.NoPageRetirement:
			return nvml.FEATURE_DISABLED, nvml.ERROR_NOT_SUPPORTED
		case st.RetiredPagesPending:
			return nvml.FEATURE_ENABLED, nvml.SUCCESS
		default:
			return nvml.FEATURE_DISABLED, nvml.SUCCESS
		}
	}
	d.IsMigDeviceHandleFunc = func() (bool, nvml.Return) { return false, nvml.SUCCESS }
	d.GetMaxMigDeviceCountFunc = func() (int, nvml.Return) { return maxMIG, nvml.SUCCESS }
	d.GetMigDeviceHandleByIndexFunc = func(i int) (nvml.Device, nvml.Return) {
		if i < 0 || i >= maxMIG {
			return nil, nvml.ERROR_INVALID_ARGUMENT
		}
		h.mu.Lock()
		defer h.mu.Unlock()
		if slots := h.migs[d]; i < len(slots) && slots[i] != nil {
			return slots[i], nvml.SUCCESS
		}
		return nil, nvml.ERROR_NOT_FOUND
	}
	d.RegisterEventsFunc = func(types uint64, set nvml.EventSet) nvml.Return {
		es, ok := set.(*eventSet)
		if !ok || types == 0 {
			return nvml.ERROR_INVALID_ARGUMENT
		}
		h.mu.Lock()
		defer h.mu.Unlock()
		es.registered[d] = true
		es.types |= types
		return nvml.SUCCESS
	}
}

// AddMIG turns MIG mode on for GPU i and makes one MIG device of the given
// GPU instance profile (nvml.GPU_INSTANCE_PROFILE_*), through the mock's
// own GPU and compute instance calls. Devices take every other slot: NVML
// leaves slots empty (ERROR_NOT_FOUND) and readers must skip them.
func (h *Host) AddMIG(i, profile int) (*MIG, error) {
	d := h.GPU(i)
	if ret, _ := d.SetMigMode(nvml.DEVICE_MIG_ENABLE); ret != nvml.SUCCESS {
		return nil, fmt.Errorf("MIG mode: %v", ret)
	}
	gip, ret := d.GetGpuInstanceProfileInfo(profile)
	if ret != nvml.SUCCESS {
		return nil, fmt.Errorf("GPU instance profile %d: %v", profile, ret)
	}
	gi, ret := d.CreateGpuInstance(&gip)
	if ret != nvml.SUCCESS {
		return nil, fmt.Errorf("GPU instance: %v", ret)
	}
	cip, ret := gi.GetComputeInstanceProfileInfo(nvml.COMPUTE_INSTANCE_PROFILE_1_SLICE, nvml.COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED)
	if ret != nvml.SUCCESS {
		return nil, fmt.Errorf("compute instance profile: %v", ret)
	}
	ci, ret := gi.CreateComputeInstance(&cip)
	if ret != nvml.SUCCESS {
		return nil, fmt.Errorf("compute instance: %v", ret)
	}
	giInfo, _ := gi.GetInfo()
	ciInfo, _ := ci.GetInfo()
	m := &MIG{Device: &mock.Device{}, UUID: "MIG-" + newUUID(), Parent: d, GPUInstance: int(giInfo.Id), ComputeInstance: int(ciInfo.Id)}
	name := fmt.Sprintf("%s MIG %dg.%dgb", d.Config.Name, gip.SliceCount, (gip.MemorySizeMB+1023)/1024)
	mem := nvml.Memory{Total: gip.MemorySizeMB << 20}
	m.GetUUIDFunc = func() (string, nvml.Return) {
		if h.lost(d) {
			return "", nvml.ERROR_GPU_IS_LOST
		}
		return m.UUID, nvml.SUCCESS
	}
	m.GetNameFunc = func() (string, nvml.Return) { return name, nvml.SUCCESS }
	m.GetMemoryInfoFunc = func() (nvml.Memory, nvml.Return) {
		if h.lost(d) {
			return nvml.Memory{}, nvml.ERROR_GPU_IS_LOST
		}
		procs, _ := h.computeProcs(d, true, m.GPUInstance, m.ComputeInstance)
		return used(mem.Total, procs), nvml.SUCCESS
	}
	m.GetComputeRunningProcessesFunc = func() ([]nvml.ProcessInfo, nvml.Return) {
		return h.computeProcs(d, true, m.GPUInstance, m.ComputeInstance)
	}
	m.IsMigDeviceHandleFunc = func() (bool, nvml.Return) { return true, nvml.SUCCESS }
	m.GetDeviceHandleFromMigDeviceHandleFunc = func() (nvml.Device, nvml.Return) { return d, nvml.SUCCESS }
	m.GetGpuInstanceIdFunc = func() (int, nvml.Return) { return m.GPUInstance, nvml.SUCCESS }
	m.GetComputeInstanceIdFunc = func() (int, nvml.Return) { return m.ComputeInstance, nvml.SUCCESS }
	// Events are registered on the GPU, never on a MIG handle.
	m.RegisterEventsFunc = func(uint64, nvml.EventSet) nvml.Return { return nvml.ERROR_NOT_SUPPORTED }
	// GetMinorNumber is left out: NVML has none for a MIG handle, and
	// the mock panics if it is asked. So are the memory health queries,
	// which concern the whole GPU.

	h.mu.Lock()
	defer h.mu.Unlock()
	slots := h.migs[d]
	n := 0
	for _, s := range slots {
		if s != nil {
			n++
		}
	}
	slot := 2*n + 1
	if slot >= maxMIG {
		return nil, errors.New("no free MIG slot")
	}
	for len(slots) <= slot {
		slots = append(slots, nil)
	}
	slots[slot] = m
	h.migs[d] = slots
	return m, nil
}

// MIGs are GPU i's MIG devices in slot order.
func (h *Host) MIGs(i int) []*MIG {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []*MIG
	for _, m := range h.migs[h.GPU(i)] {
		if m != nil {
			out = append(out, m)
		}
	}
	return out
}

// FailInit makes every Init fail with ret (SUCCESS: succeed again), as
// go-nvml does when libnvidia-ml does not load (ERROR_LIBRARY_NOT_FOUND)
// or the kernel module is missing (ERROR_DRIVER_NOT_LOADED).
func (h *Host) FailInit(ret nvml.Return) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.initRet = ret
}

// FailWait makes every event wait fail at once with ret until it is
// called with SUCCESS.
func (h *Host) FailWait(ret nvml.Return) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.waitRet = ret
}

// XID raises an XID event on GPU i, on a GPU and compute instance of it
// (^uint32(0) for the whole GPU), and returns once an event set has taken
// it. As in NVML, a set the GPU is not registered with never returns it;
// an error says no set took it.
func (h *Host) XID(i int, xid uint64, gi, ci uint32) error {
	return h.Send(nvml.EventData{Device: h.GPU(i), EventType: nvml.EventTypeXidCriticalError, EventData: xid, GpuInstanceId: gi, ComputeInstanceId: ci})
}

// Send is XID for any event.
func (h *Host) Send(ev nvml.EventData) error {
	d := delivery{ev: ev, taken: make(chan struct{})}
	select {
	case h.events <- d:
		<-d.taken
		return nil
	case <-time.After(5 * time.Second):
		return fmt.Errorf("no event set took the event in 5 s (is anything watched?)")
	}
}

// delivery is an event on its way to a set; taken closes once the set
// has returned it or dropped it.
type delivery struct {
	ev    nvml.EventData
	taken chan struct{}
}

// Stats are counters of what the adapter did.
type Stats struct {
	// Open is Inits not yet shut down; Inits all successful ones.
	Open, Inits int
	// EventSets created and freed.
	EventSets, Freed int
	// Registered are the UUIDs of the GPUs on the newest event set, in
	// index order.
	Registered []string
	// Dropped events reached no set the GPU is registered with.
	Dropped int
}

// Stats returns the counters now.
func (h *Host) Stats() Stats {
	h.mu.Lock()
	defer h.mu.Unlock()
	s := Stats{Open: h.open, Inits: h.inits, EventSets: len(h.sets), Freed: h.freed, Dropped: h.dropped}
	if len(h.sets) > 0 {
		for d := range h.sets[len(h.sets)-1].registered {
			s.Registered = append(s.Registered, d.(*server.Device).UUID)
		}
		sort.Slice(s.Registered, func(a, b int) bool { return h.index(s.Registered[a]) < h.index(s.Registered[b]) })
	}
	return s
}

func (h *Host) index(u string) int {
	for i, d := range h.Server.Devices {
		if d.(*server.Device).UUID == u {
			return i
		}
	}
	return -1
}

type eventSet struct {
	mock.EventSet
	h          *Host
	registered map[nvml.Device]bool // guarded by h.mu
	types      uint64
	freed      bool
}

func (es *eventSet) wait(timeoutMs uint32) (nvml.EventData, nvml.Return) {
	deadline := time.After(time.Duration(timeoutMs) * time.Millisecond)
	for {
		es.h.mu.Lock()
		ret, freed := es.h.waitRet, es.freed
		es.h.mu.Unlock()
		if freed {
			return nvml.EventData{}, nvml.ERROR_INVALID_ARGUMENT
		}
		if ret != nvml.SUCCESS {
			return nvml.EventData{}, ret
		}
		select {
		case d := <-es.h.events:
			es.h.mu.Lock()
			ok := es.registered[d.ev.Device] && es.types&d.ev.EventType != 0
			if !ok {
				es.h.dropped++
			}
			es.h.mu.Unlock()
			close(d.taken)
			if ok {
				return d.ev, nvml.SUCCESS
			}
		case <-deadline:
			return nvml.EventData{}, nvml.ERROR_TIMEOUT
		}
	}
}

func (es *eventSet) free() nvml.Return {
	es.h.mu.Lock()
	defer es.h.mu.Unlock()
	if es.freed {
		return nvml.ERROR_INVALID_ARGUMENT
	}
	es.freed = true
	es.h.freed++
	return nvml.SUCCESS
}

// newUUID is a random (version 4) UUID, as NVML gives MIG devices.
func newUUID() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}
