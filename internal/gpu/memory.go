package gpu

import (
	"cmp"
	"fmt"
	"slices"
)

// DeviceMemory is a GPU's or MIG device's memory as NVML reports it, and
// the processes that use some of it.
type DeviceMemory struct {
	UUID        string
	Total, Free uint64
	// Holders use the device's memory, the largest user first.
	Holders []MemoryHolder
}

// MemoryHolder is a process with memory on a device.
type MemoryHolder struct {
	Holder
	// Used is what it uses, in bytes (0: NVML does not say).
	Used uint64
}

// MemoryUse reads the memory of the GPU or MIG device uuid (a MIG
// device's own slice of its GPU's memory) and the processes NVML lists
// on it, with their command and unit from procRoot ("/proc"). Init and
// Shutdown are its own; a nil n is the host's NVML.
func MemoryUse(n NVML, uuid, procRoot string) (DeviceMemory, error) {
	if n == nil {
		n = NewNVML()
	}
	if err := n.Init(); err != nil {
		return DeviceMemory{}, err
	}
	defer n.Shutdown()
	d, err := n.DeviceByUUID(uuid)
	if err != nil {
		return DeviceMemory{}, fmt.Errorf("memory of %s: %w", uuid, err)
	}
	total, free, err := d.Memory()
	if err != nil {
		return DeviceMemory{}, fmt.Errorf("memory of %s: %w", uuid, err)
	}
	ps, err := deviceProcesses(d)
	if err != nil {
		return DeviceMemory{}, fmt.Errorf("memory of %s: %w", uuid, err)
	}
	out := DeviceMemory{UUID: uuid, Total: total, Free: free}
	for _, p := range ps {
		out.Holders = append(out.Holders, MemoryHolder{Holder: holder(procRoot, p.PID), Used: p.UsedMemory})
	}
	slices.SortStableFunc(out.Holders, func(a, b MemoryHolder) int { return cmp.Compare(b.Used, a.Used) })
	return out, nil
}

// Bytes writes a size as systemd does (base 1024, one decimal: "1.5G").
func Bytes(n uint64) string {
	const units = "KMGTPE"
	if n < 1024 {
		return fmt.Sprintf("%dB", n)
	}
	f, i := float64(n)/1024, 0
	for f >= 1024 && i < len(units)-1 {
		f /= 1024
		i++
	}
	s := fmt.Sprintf("%.1f", f)
	if s[len(s)-2:] == ".0" {
		s = s[:len(s)-2]
	}
	return s + units[i:i+1]
}
