package gpu

import (
	"errors"
	"fmt"
	"strings"
)

// Usable asks NVML whether the GPU (or MIG device) uuid answers and needs
// no reset: its handle resolves by UUID, its UUID and memory read back,
// and, where NVML supports it, neither the driver's recovery action nor a
// pending row remap or page retirement asks for a reset. A GPU that is
// lost, missing or needs a reset is not usable; why says which. err is
// for when NVML cannot be asked at all (not loaded, or an answer that says
// nothing about the GPU). A MIG device is as usable as its GPU. Usable
// initialises and shuts down NVML itself; a nil n is the host's NVML.
func Usable(n NVML, uuid string) (ok bool, why string, err error) {
	if n == nil {
		n = NewNVML()
	}
	if err := n.Init(); err != nil {
		return false, "", err
	}
	defer n.Shutdown()

	d, err := n.DeviceByUUID(uuid)
	if err != nil {
		return notUsable(uuid, err)
	}
	got, err := d.UUID()
	if err != nil {
		return notUsable(uuid, err)
	}
	if !strings.EqualFold(got, uuid) {
		return false, "", fmt.Errorf("NVML: device %s answers to UUID %s", uuid, got)
	}
	if _, err := d.MemoryTotal(); err != nil {
		return notUsable(uuid, err)
	}
	gpu := d
	p, err := d.Parent()
	if err != nil {
		return notUsable(uuid, err)
	}
	if p != nil {
		gpu = p
	}
	reason, err := gpu.ResetPending()
	if err != nil {
		return notUsable(uuid, err)
	}
	if reason != "" {
		return false, "GPU " + uuid + " needs a reset: " + reason, nil
	}
	return true, "", nil
}

// notUsable turns NVML's answers about the GPU into a reason and passes
// others on as errors.
func notUsable(uuid string, err error) (bool, string, error) {
	switch {
	case errors.Is(err, ErrGPULost):
		return false, "GPU " + uuid + " is lost (" + err.Error() + ")", nil
	case errors.Is(err, ErrResetRequired):
		return false, "GPU " + uuid + " needs a reset (" + err.Error() + ")", nil
	case errors.Is(err, ErrNoSuchGPU):
		return false, "GPU " + uuid + " is missing: NVML does not find it (" + err.Error() + ")", nil
	}
	return false, "", err
}
