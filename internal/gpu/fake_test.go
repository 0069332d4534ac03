package gpu

import (
	"errors"
	"fmt"
	"sync"
	"time"
)

// fakeNVML is a host with whatever GPUs a test gives it.
type fakeNVML struct {
	initErr error
	gpus    []*fakeDev
	events  chan Event

	mu         sync.Mutex
	waitErr    error // the next event wait fails with it
	open       int   // Inits not yet shut down
	inits      int
	registered []string
}

type fakeDev struct {
	uuid, name string
	minor      int
	minorErr   error
	mem        uint64
	migs       []*fakeDev
	parent     *fakeDev
	gi, ci     int
	procs      []GPUProcess
	resetWhy   string
	recovery   RecoveryAction
}

func (f *fakeNVML) Init() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.initErr != nil {
		return f.initErr
	}
	f.open++
	f.inits++
	return nil
}

func (f *fakeNVML) Shutdown() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.open == 0 {
		return errors.New("fake: Shutdown without Init")
	}
	f.open--
	return nil
}

func (f *fakeNVML) check() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.open == 0 {
		return errors.New("fake: called without Init")
	}
	return nil
}

func (f *fakeNVML) DeviceCount() (int, error) { return len(f.gpus), f.check() }

func (f *fakeNVML) DeviceByIndex(i int) (Device, error) {
	if err := f.check(); err != nil {
		return nil, err
	}
	if i < 0 || i >= len(f.gpus) {
		return nil, fmt.Errorf("fake: no device %d", i)
	}
	return f.gpus[i], nil
}

func (f *fakeNVML) DeviceByUUID(uuid string) (Device, error) {
	if err := f.check(); err != nil {
		return nil, err
	}
	for _, g := range f.gpus {
		for _, d := range append([]*fakeDev{g}, g.migs...) {
			if d.uuid == uuid {
				return d, nil
			}
		}
	}
	return nil, errors.New("NVML: device " + uuid + ": ERROR_NOT_FOUND")
}

func (f *fakeNVML) DeviceByPCI(busID string) (Device, error) {
	return nil, errors.New("NVML: device at PCI " + busID + ": ERROR_NOT_FOUND")
}

func (f *fakeNVML) NewEventSet() (EventSet, error) {
	if err := f.check(); err != nil {
		return nil, err
	}
	return &fakeEventSet{f: f}, nil
}

func (d *fakeDev) UUID() (string, error)           { return d.uuid, nil }
func (d *fakeDev) Name() (string, error)           { return d.name, nil }
func (d *fakeDev) MemoryTotal() (uint64, error)    { return d.mem, nil }
func (d *fakeDev) Memory() (uint64, uint64, error) { return d.mem, d.mem, nil }

func (d *fakeDev) Minor() (int, error) {
	if d.parent != nil {
		return 0, errors.New("ERROR_NOT_SUPPORTED") // as NVML does for MIG handles
	}
	return d.minor, d.minorErr
}

func (d *fakeDev) MIGDevices() ([]Device, error) {
	out := make([]Device, len(d.migs))
	for i, m := range d.migs {
		out[i] = m
	}
	return out, nil
}

func (d *fakeDev) Parent() (Device, error) {
	if d.parent == nil {
		return nil, nil
	}
	return d.parent, nil
}

func (d *fakeDev) MIGInstance() (int, int, error) {
	if d.parent == nil {
		return 0, 0, errors.New("ERROR_NOT_SUPPORTED")
	}
	return d.gi, d.ci, nil
}

func (d *fakeDev) ComputeProcesses() ([]GPUProcess, error) { return d.procs, nil }
func (d *fakeDev) ResetPending() (string, error)           { return d.resetWhy, nil }
func (d *fakeDev) RecoveryAction() (RecoveryAction, error) { return d.recovery, nil }

type fakeEventSet struct{ f *fakeNVML }

func (s *fakeEventSet) RegisterXID(d Device) error {
	fd := d.(*fakeDev)
	if fd.parent != nil {
		return errors.New("fake: events on a MIG handle") // NVML wants the GPU
	}
	s.f.mu.Lock()
	defer s.f.mu.Unlock()
	s.f.registered = append(s.f.registered, fd.uuid)
	return nil
}

func (s *fakeEventSet) Wait(time.Duration) (*Event, error) {
	s.f.mu.Lock()
	err := s.f.waitErr
	s.f.waitErr = nil
	s.f.mu.Unlock()
	if err != nil {
		return nil, err
	}
	select {
	case ev := <-s.f.events:
		return &ev, nil
	case <-time.After(10 * time.Millisecond): // shorter than NVML's, for quick tests
		return nil, nil
	}
}

func (s *fakeEventSet) Free() error { return nil }

// The test host: GPU 0 and 1 have minors 3 and 7, and GPU 1 is in MIG mode
// with one MIG device (GPU instance 1, compute instance 0).
const (
	uuidA   = "GPU-8f2c1a70-0000-4000-8000-00000000000a"
	uuidB   = "GPU-8f2c1a70-0000-4000-8000-00000000000b"
	uuidMIG = "MIG-5d1e0b7c-0000-4000-8000-0000000000c1"
)

func newFake() *fakeNVML {
	b := &fakeDev{uuid: uuidB, name: "NVIDIA H100 80GB HBM3", minor: 7, mem: 80 << 30}
	b.migs = []*fakeDev{{uuid: uuidMIG, name: "NVIDIA H100 80GB HBM3 MIG 1g.10gb", mem: 10 << 30, parent: b, gi: 1, ci: 0}}
	return &fakeNVML{
		gpus: []*fakeDev{
			{uuid: uuidA, name: "NVIDIA H100 80GB HBM3", minor: 3, mem: 80 << 30},
			b,
		},
		events: make(chan Event),
	}
}

func missingLib() *fakeNVML { return &fakeNVML{initErr: ErrNoLibrary} }

var (
	gpuA   = GPU{Index: 0, UUID: uuidA, Minor: 3, Node: "/dev/nvidia3", Name: "NVIDIA H100 80GB HBM3", MemoryBytes: 80 << 30}
	gpuB   = GPU{Index: 1, UUID: uuidB, Minor: 7, Node: "/dev/nvidia7", Name: "NVIDIA H100 80GB HBM3", MemoryBytes: 80 << 30}
	gpuMIG = GPU{Index: 1, UUID: uuidMIG, Minor: 7, Node: "/dev/nvidia7", Name: "NVIDIA H100 80GB HBM3 MIG 1g.10gb", MemoryBytes: 10 << 30, Parent: uuidB}
)
