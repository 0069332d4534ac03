package gpu

import (
	"errors"
	"time"
)

// NVML's answers that say something about the GPU rather than about the
// call: errors.Is finds them in what the adapter returns.
var (
	ErrGPULost       = errors.New("the GPU is lost (it fell off the bus or stopped answering)")
	ErrResetRequired = errors.New("the GPU needs a reset before it can be used")
	ErrNoSuchGPU     = errors.New("NVML does not find this GPU")
)

// NVML is the part of NVIDIA's management library this package uses, so
// tests can stand in for the driver. NewNVML is the real one. Init and
// Shutdown nest; handles are valid only between them.
type NVML interface {
	// Init loads libnvidia-ml and initialises NVML; ErrNoLibrary when the
	// library is missing.
	Init() error
	Shutdown() error
	DeviceCount() (int, error)
	DeviceByIndex(i int) (Device, error)
	// DeviceByUUID takes GPU and MIG UUIDs.
	DeviceByUUID(uuid string) (Device, error)
	// DeviceByPCI takes a GPU's PCI bus id, domain:bus:device.function
	// ("0000:3b:00.0").
	DeviceByPCI(busID string) (Device, error)
	NewEventSet() (EventSet, error)
}

// Device is an NVML device handle: a GPU or a MIG device.
type Device interface {
	UUID() (string, error)
	Minor() (int, error)
	Name() (string, error)
	MemoryTotal() (uint64, error)
	// Memory is the device's total and free memory in bytes (a MIG
	// device's own).
	Memory() (total, free uint64, err error)
	// MIGDevices lists a GPU's MIG devices when MIG mode is on; none
	// otherwise.
	MIGDevices() ([]Device, error)
	// Parent is a MIG device's GPU; nil for a GPU.
	Parent() (Device, error)
	// MIGInstance is a MIG device's GPU and compute instance ids.
	MIGInstance() (gi, ci int, err error)
	// ComputeProcesses are the processes running compute work on the
	// device; on a GPU in MIG mode, those of all its MIG devices.
	ComputeProcesses() ([]GPUProcess, error)
	// ResetPending says why the GPU must be reset (or the host rebooted)
	// before it is used again, "" when nothing says so. Checks NVML does
	// not support on this GPU or driver are skipped.
	ResetPending() (why string, err error)
	// RecoveryAction is the driver's GPU recovery action (R550 and
	// newer); RecoveryUnknown where NVML does not report one.
	RecoveryAction() (RecoveryAction, error)
}

// RecoveryAction is what the driver says the GPU needs
// (FI_DEV_GET_GPU_RECOVERY_ACTION), folded to what pool-managerd can do
// about it.
type RecoveryAction int

const (
	// RecoveryUnknown: NVML does not report it (an older driver).
	RecoveryUnknown RecoveryAction = iota
	// RecoveryNone: the driver asks for nothing.
	RecoveryNone
	// RecoveryReset: a GPU reset (after draining, or of its PCIe bus).
	RecoveryReset
	// RecoveryReboot: a reboot of the host.
	RecoveryReboot
	// RecoveryOther: something else (draining NVLink peer traffic,
	// recovering an IMEX domain, a value newer than this code).
	RecoveryOther
)

// GPUProcess is a process NVML reports on a device.
type GPUProcess struct {
	PID int
	// UsedMemory is the device memory it uses, in bytes (0: NVML does
	// not say).
	UsedMemory uint64
	// GPUInstance and ComputeInstance place it on a MIG device;
	// NoInstance outside MIG mode.
	GPUInstance, ComputeInstance uint32
}

// EventSet receives XID events of the GPUs registered with it.
type EventSet interface {
	RegisterXID(d Device) error
	// Wait returns the next XID event, or nil when timeout passes first.
	Wait(timeout time.Duration) (*Event, error)
	Free() error
}

// Event is one XID event.
type Event struct {
	UUID string // the GPU's (never a MIG device's) UUID
	XID  uint64
	// GPUInstance and ComputeInstance place the event on a MIG device;
	// NoInstance when it concerns the whole GPU.
	GPUInstance, ComputeInstance uint32
}

// NoInstance is NVML's "no MIG instance" in event data.
const NoInstance = ^uint32(0)
