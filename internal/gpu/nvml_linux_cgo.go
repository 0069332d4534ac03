//go:build linux && cgo

package gpu

import (
	"encoding/binary"
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
	return &nvmlError{op: op, ret: r}
}

// nvmlError is what NVML answered to op; errors.Is finds both the
// nvml.Return and, for answers about the GPU, ErrGPULost,
// ErrResetRequired or ErrNoSuchGPU.
type nvmlError struct {
	op  string
	ret nvml.Return
}

func (e *nvmlError) Error() string { return fmt.Sprintf("NVML: %s: %v", e.op, e.ret) }

func (e *nvmlError) Unwrap() []error {
	errs := []error{e.ret}
	switch e.ret {
	case nvml.ERROR_GPU_IS_LOST:
		errs = append(errs, ErrGPULost)
	case nvml.ERROR_RESET_REQUIRED:
		errs = append(errs, ErrResetRequired)
	case nvml.ERROR_NOT_FOUND:
		errs = append(errs, ErrNoSuchGPU)
	}
	return errs
}

// unsupported are NVML's answers for a query this GPU or driver lacks.
func unsupported(r nvml.Return) bool {
	return r == nvml.ERROR_NOT_SUPPORTED || r == nvml.ERROR_FUNCTION_NOT_FOUND || r == nvml.ERROR_INVALID_ARGUMENT
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

func (r *realNVML) DeviceByPCI(busID string) (Device, error) {
	if err := r.ready(); err != nil {
		return nil, err
	}
	d, ret := r.lib.DeviceGetHandleByPciBusId(busID)
	if err := nvmlErr("device at PCI "+busID, ret); err != nil {
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
	return &realEventSet{s: s}, nil
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

func (d realDevice) Memory() (uint64, uint64, error) {
	m, ret := d.d.GetMemoryInfo()
	return m.Total, m.Free, nvmlErr("memory info", ret)
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

func (d realDevice) ComputeProcesses() ([]GPUProcess, error) {
	ps, ret := d.d.GetComputeRunningProcesses()
	if err := nvmlErr("running compute processes", ret); err != nil {
		return nil, err
	}
	out := make([]GPUProcess, 0, len(ps))
	for _, p := range ps {
		used := p.UsedGpuMemory
		if used == ^uint64(0) { // NVML_VALUE_NOT_AVAILABLE
			used = 0
		}
		out = append(out, GPUProcess{PID: int(p.Pid), UsedMemory: used, GPUInstance: p.GpuInstanceId, ComputeInstance: p.ComputeInstanceId})
	}
	return out, nil
}

// recoveryActions name NVML's nvmlDeviceGpuRecoveryAction_t values.
var recoveryActions = map[uint64]string{
	uint64(nvml.GPU_RECOVERY_ACTION_GPU_RESET):           "a GPU reset",
	uint64(nvml.GPU_RECOVERY_ACTION_NODE_REBOOT):         "a reboot of the host",
	uint64(nvml.GPU_RECOVERY_ACTION_DRAIN_P2P):           "draining peer-to-peer (NVLink) traffic",
	uint64(nvml.GPU_RECOVERY_ACTION_DRAIN_AND_RESET):     "draining peer-to-peer traffic and a GPU reset",
	uint64(nvml.GPU_RECOVERY_ACTION_RECOVER_IMEX_DOMAIN): "recovering its IMEX domain",
	uint64(nvml.GPU_RECOVERY_ACTION_BUS_RESET):           "a reset of its PCIe bus",
	uint64(nvml.GPU_RECOVERY_ACTION_SYSTEM_REBOOT):       "a reboot of the system",
}

// ResetPending asks, in this order: the driver's own recovery action
// (R550 and newer), pending or failed row remapping (Ampere and newer),
// and pending retired pages (older GPUs).
func (d realDevice) ResetPending() (string, error) {
	fv := []nvml.FieldValue{{FieldId: nvml.FI_DEV_GET_GPU_RECOVERY_ACTION}}
	ret := d.d.GetFieldValues(fv)
	if !unsupported(ret) {
		if err := nvmlErr("GPU recovery action", ret); err != nil {
			return "", err
		}
		switch r := fv[0].NvmlReturn; {
		case r == uint32(nvml.SUCCESS):
			if a := fieldUint(fv[0]); a != uint64(nvml.GPU_RECOVERY_ACTION_NONE) {
				name := recoveryActions[a]
				if name == "" {
					name = fmt.Sprintf("recovery action %d", a)
				}
				return "the driver asks for " + name, nil
			}
		case r == uint32(nvml.ERROR_GPU_IS_LOST):
			return "", nvmlErr("GPU recovery action", nvml.ERROR_GPU_IS_LOST)
		case r == uint32(nvml.ERROR_RESET_REQUIRED):
			return "", nvmlErr("GPU recovery action", nvml.ERROR_RESET_REQUIRED)
		}
	}

	_, _, pending, failed, ret := d.d.GetRemappedRows()
	if !unsupported(ret) {
		if err := nvmlErr("remapped rows", ret); err != nil {
			return "", err
		}
		if failed {
			return "row remapping failed: the GPU's memory needs service", nil
		}
		if pending {
			return "row remapping is pending (it takes effect at the next GPU reset)", nil
		}
	}

	st, ret := d.d.GetRetiredPagesPendingStatus()
	if !unsupported(ret) {
		if err := nvmlErr("retired pages", ret); err != nil {
			return "", err
		}
		if st == nvml.FEATURE_ENABLED {
			return "retired pages are pending (they take effect at the next GPU reset or reboot)", nil
		}
	}
	return "", nil
}

// RecoveryAction reads the driver's recovery action.
func (d realDevice) RecoveryAction() (RecoveryAction, error) {
	fv := []nvml.FieldValue{{FieldId: nvml.FI_DEV_GET_GPU_RECOVERY_ACTION}}
	ret := d.d.GetFieldValues(fv)
	if unsupported(ret) {
		return RecoveryUnknown, nil
	}
	if err := nvmlErr("GPU recovery action", ret); err != nil {
		return RecoveryUnknown, err
	}
	switch r := fv[0].NvmlReturn; {
	case r == uint32(nvml.SUCCESS):
	case r == uint32(nvml.ERROR_GPU_IS_LOST):
		return RecoveryUnknown, nvmlErr("GPU recovery action", nvml.ERROR_GPU_IS_LOST)
	case r == uint32(nvml.ERROR_RESET_REQUIRED):
		return RecoveryReset, nil
	default:
		return RecoveryUnknown, nil
	}
	switch fieldUint(fv[0]) {
	case uint64(nvml.GPU_RECOVERY_ACTION_NONE):
		return RecoveryNone, nil
	case uint64(nvml.GPU_RECOVERY_ACTION_GPU_RESET), uint64(nvml.GPU_RECOVERY_ACTION_DRAIN_AND_RESET),
		uint64(nvml.GPU_RECOVERY_ACTION_BUS_RESET):
		return RecoveryReset, nil
	case uint64(nvml.GPU_RECOVERY_ACTION_NODE_REBOOT), uint64(nvml.GPU_RECOVERY_ACTION_SYSTEM_REBOOT):
		return RecoveryReboot, nil
	}
	return RecoveryOther, nil
}

// fieldUint reads an unsigned NVML field value of any width.
func fieldUint(v nvml.FieldValue) uint64 {
	switch v.ValueType {
	case uint32(nvml.VALUE_TYPE_UNSIGNED_INT):
		return uint64(binary.NativeEndian.Uint32(v.Value[:4]))
	case uint32(nvml.VALUE_TYPE_UNSIGNED_SHORT):
		return uint64(binary.NativeEndian.Uint16(v.Value[:2]))
	}
	return binary.NativeEndian.Uint64(v.Value[:])
}

// realEventSet remembers the UUID of each device it registered: the GPU
// of an XID 79 (fallen off the bus) no longer answers GetUUID, and that
// XID must still reach its pools.
type realEventSet struct {
	s          nvml.EventSet
	registered []registered
}

type registered struct {
	d    nvml.Device
	uuid string
}

func (s *realEventSet) RegisterXID(d Device) error {
	rd, ok := d.(realDevice)
	if !ok {
		return fmt.Errorf("NVML: register XID events: %T is not an NVML device", d)
	}
	if err := nvmlErr("register XID events", rd.d.RegisterEvents(nvml.EventTypeXidCriticalError, s.s)); err != nil {
		return err
	}
	if uuid, ret := rd.d.GetUUID(); ret == nvml.SUCCESS {
		s.registered = append(s.registered, registered{rd.d, uuid})
	}
	return nil
}

// same compares device handles; a handle type that cannot be compared is
// never the same.
func same(a, b nvml.Device) (eq bool) {
	defer func() {
		if recover() != nil {
			eq = false
		}
	}()
	return a == b
}

func (s *realEventSet) Wait(timeout time.Duration) (*Event, error) {
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
	ev := &Event{XID: data.EventData, GPUInstance: data.GpuInstanceId, ComputeInstance: data.ComputeInstanceId}
	uuid, ret := data.Device.GetUUID()
	if ret == nvml.SUCCESS {
		ev.UUID = uuid
		return ev, nil
	}
	for _, r := range s.registered {
		if same(r.d, data.Device) {
			ev.UUID = r.uuid
			return ev, nil
		}
	}
	return nil, nvmlErr("event device UUID", ret)
}

func (s *realEventSet) Free() error { return nvmlErr("free event set", s.s.Free()) }
