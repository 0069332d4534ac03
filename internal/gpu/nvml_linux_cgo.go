//go:build linux && cgo

package gpu

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// NewNVML returns the host's NVML: libnvidia-ml through go-nvml.
func NewNVML() NVML { return NewNVMLWith(nvml.New()) }

// NewNVMLWith returns NVML on lib: the real library, or one of go-nvml's
// mocks in tests. go-nvml binds its C symbols lazily: any call other than
// Init before Init has loaded libnvidia-ml kills the process ("symbol
// lookup error"), which no recover can catch. So every entry point checks
// that Init succeeded and fails with an error otherwise.
func NewNVMLWith(lib nvml.Interface) NVML { return &realNVML{lib: lib} }

type realNVML struct {
	lib nvml.Interface
	mu  sync.Mutex
	n   int // successful Inits not yet shut down
}

func nvmlErr(op string, r nvml.Return) error {
	switch r {
	case nvml.SUCCESS:
		return nil
	case nvml.ERROR_LIBRARY_NOT_FOUND:
		return ErrNoLibrary
	}
	return fmt.Errorf("NVML: %s: %w", op, r)
}

var errNotInit = errors.New("NVML: not initialised (Init failed or was not called)")

func (r *realNVML) Init() (err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	// A panic in the binding must not take the daemon down.
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("NVML: Init: %v", p)
		}
	}()
	if err := nvmlErr("Init", r.lib.Init()); err != nil {
		return err
	}
	r.n++
	return nil
}

func (r *realNVML) Shutdown() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.n == 0 {
		return errNotInit
	}
	r.n--
	return nvmlErr("Shutdown", r.lib.Shutdown())
}

func (r *realNVML) ready() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.n == 0 {
		return errNotInit
	}
	return nil
}

func (r *realNVML) DeviceCount() (int, error) {
	if err := r.ready(); err != nil {
		return 0, err
	}
	n, ret := r.lib.DeviceGetCount()
	return n, nvmlErr("device count", ret)
}

func (r *realNVML) DeviceByIndex(i int) (Device, error) {
	if err := r.ready(); err != nil {
		return nil, err
	}
	d, ret := r.lib.DeviceGetHandleByIndex(i)
	if err := nvmlErr(fmt.Sprintf("device %d", i), ret); err != nil {
		return nil, err
	}
	return realDevice{d}, nil
}

func (r *realNVML) DeviceByUUID(uuid string) (Device, error) {
	if err := r.ready(); err != nil {
		return nil, err
	}
	d, ret := r.lib.DeviceGetHandleByUUID(uuid)
	if err := nvmlErr("device "+uuid, ret); err != nil {
		return nil, err
	}
	return realDevice{d}, nil
}

func (r *realNVML) NewEventSet() (EventSet, error) {
	if err := r.ready(); err != nil {
		return nil, err
	}
	s, ret := r.lib.EventSetCreate()
	if err := nvmlErr("event set", ret); err != nil {
		return nil, err
	}
	return realEventSet{s}, nil
}

type realDevice struct{ d nvml.Device }

func (d realDevice) UUID() (string, error) {
	u, ret := d.d.GetUUID()
	return u, nvmlErr("UUID", ret)
}

func (d realDevice) Minor() (int, error) {
	m, ret := d.d.GetMinorNumber()
	return m, nvmlErr("minor number", ret)
}

func (d realDevice) Name() (string, error) {
	n, ret := d.d.GetName()
	return n, nvmlErr("name", ret)
}

func (d realDevice) MemoryTotal() (uint64, error) {
	m, ret := d.d.GetMemoryInfo()
	return m.Total, nvmlErr("memory info", ret)
}

func (d realDevice) MIGDevices() ([]Device, error) {
	cur, _, ret := d.d.GetMigMode()
	if ret == nvml.ERROR_NOT_SUPPORTED || ret == nvml.SUCCESS && cur != nvml.DEVICE_MIG_ENABLE {
		return nil, nil
	}
	if err := nvmlErr("MIG mode", ret); err != nil {
		return nil, err
	}
	max, ret := d.d.GetMaxMigDeviceCount()
	if err := nvmlErr("MIG device count", ret); err != nil {
		return nil, err
	}
	var out []Device
	for i := 0; i < max; i++ {
		m, ret := d.d.GetMigDeviceHandleByIndex(i)
		if ret == nvml.ERROR_NOT_FOUND { // slots without a MIG device
			continue
		}
		if err := nvmlErr(fmt.Sprintf("MIG device %d", i), ret); err != nil {
			return nil, err
		}
		out = append(out, realDevice{m})
	}
	return out, nil
}

func (d realDevice) Parent() (Device, error) {
	mig, ret := d.d.IsMigDeviceHandle()
	if err := nvmlErr("MIG handle check", ret); err != nil || !mig {
		return nil, err
	}
	p, ret := d.d.GetDeviceHandleFromMigDeviceHandle()
	if err := nvmlErr("MIG parent", ret); err != nil {
		return nil, err
	}
	return realDevice{p}, nil
}

func (d realDevice) MIGInstance() (int, int, error) {
	gi, ret := d.d.GetGpuInstanceId()
	if err := nvmlErr("GPU instance id", ret); err != nil {
		return 0, 0, err
	}
	ci, ret := d.d.GetComputeInstanceId()
	return gi, ci, nvmlErr("compute instance id", ret)
}

type realEventSet struct{ s nvml.EventSet }

func (s realEventSet) RegisterXID(d Device) error {
	rd, ok := d.(realDevice)
	if !ok {
		return fmt.Errorf("NVML: register XID events: %T is not an NVML device", d)
	}
	return nvmlErr("register XID events", rd.d.RegisterEvents(nvml.EventTypeXidCriticalError, s.s))
}

func (s realEventSet) Wait(timeout time.Duration) (*Event, error) {
	data, ret := s.s.Wait(uint32(timeout.Milliseconds()))
	if ret == nvml.ERROR_TIMEOUT {
		return nil, nil
	}
	if err := nvmlErr("wait for events", ret); err != nil {
		return nil, err
	}
	if data.EventType != nvml.EventTypeXidCriticalError || data.Device == nil {
		return nil, nil
	}
	uuid, ret := data.Device.GetUUID()
	if err := nvmlErr("event device UUID", ret); err != nil {
		return nil, err
	}
	return &Event{UUID: uuid, XID: data.EventData, GPUInstance: data.GpuInstanceId, ComputeInstance: data.ComputeInstanceId}, nil
}

func (s realEventSet) Free() error { return nvmlErr("free event set", s.s.Free()) }
