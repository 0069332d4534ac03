// Package gpu is the GPU inventory of the host: which GPUs exist, their
// UUIDs and device nodes. pool-managerd confines each engine to its pool's
// GPUs with DevicePolicy=closed and DeviceAllow= on exactly those nodes, so
// the nodes must come from the driver (NVML) and never be guessed from the
// index; hosts without NVML (tests, the demo) use a static inventory from
// the [Inventory] section instead.
package gpu

import (
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/llorch/pool-managerd/internal/config"
)

// GPU is one device a pool can name: a whole GPU or a MIG device.
type GPU struct {
	// Index is the NVML index; for a MIG device, its parent's.
	Index int
	// UUID is GPU-<uuid>, or MIG-<uuid> for a MIG device.
	UUID string
	// Minor is the device minor (-1 when a static node does not tell); for
	// a MIG device, its parent's: device cgroups cannot split a GPU.
	Minor int
	// Node is the device node, e.g. /dev/nvidia3.
	Node        string
	Name        string // "" for static
	MemoryBytes uint64 // 0 for static
	// Parent is the parent GPU's UUID for a MIG device, "" otherwise.
	Parent string
}

// Source names where an inventory came from.
const (
	SourceNVML   = "nvml"
	SourceStatic = "static"
)

// Inventory is a snapshot of the host's GPUs taken by Load.
type Inventory struct {
	Source string
	GPUs   []GPU
	// Control are the control nodes every engine needs besides its GPUs:
	// those present of /dev/nvidiactl, /dev/nvidia-uvm, /dev/nvidia-uvm-tools
	// (NVML), or the ControlDevice= lines (static).
	Control []string
	// Fallback says why Backend=auto did not use NVML; nil otherwise.
	Fallback error

	// legacy maps lower-cased MIG-GPU-<uuid>/<gi>/<ci> names to MIG UUIDs.
	legacy map[string]string
}

// ControlNodes are the driver's control nodes an engine may need.
var ControlNodes = []string{"/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"}

// ErrNoLibrary is NVML's Init failure when libnvidia-ml cannot be loaded.
var ErrNoLibrary = errors.New("NVML: libnvidia-ml.so.1 not found (is the NVIDIA driver installed?); use [Inventory] Backend=static with Device= lines on hosts without it")

// Load builds the inventory for cfg.Backend. devRoot stands in for /dev when
// looking for control nodes ("" is /dev); reported paths are always under
// /dev. A nil lib means NewNVML(). With Backend=auto, any NVML Init failure
// falls back to the static inventory and is kept in Fallback; an empty
// static inventory is not an error until a pool asks Resolve for a GPU.
func Load(cfg config.Inventory, lib NVML, devRoot string) (*Inventory, error) {
	if cfg.Backend == config.BackendStatic {
		return loadStatic(cfg, nil), nil
	}
	if lib == nil {
		lib = NewNVML()
	}
	if err := lib.Init(); err != nil {
		if cfg.Backend == config.BackendAuto {
			return loadStatic(cfg, err), nil
		}
		return nil, fmt.Errorf("GPU inventory ([Inventory] Backend=%s): %w", cfg.Backend, err)
	}
	defer lib.Shutdown()
	inv, err := loadNVML(lib)
	if err != nil {
		return nil, fmt.Errorf("GPU inventory from NVML: %w", err)
	}
	if devRoot == "" {
		devRoot = "/dev"
	}
	for _, n := range ControlNodes {
		if _, err := os.Stat(filepath.Join(devRoot, strings.TrimPrefix(n, "/dev/"))); err == nil {
			inv.Control = append(inv.Control, n)
		}
	}
	return inv, nil
}

var minorRe = regexp.MustCompile(`^/dev/nvidia([0-9]+)$`)

func loadStatic(cfg config.Inventory, nvmlErr error) *Inventory {
	inv := &Inventory{Source: SourceStatic, Control: append([]string(nil), cfg.ControlDevices...)}
	if nvmlErr != nil {
		inv.Fallback = fmt.Errorf("[Inventory] Backend=auto could not use NVML: %w", nvmlErr)
	}
	for _, d := range cfg.Devices {
		minor := -1
		if m := minorRe.FindStringSubmatch(d.Node); m != nil {
			minor, _ = strconv.Atoi(m[1])
		}
		inv.GPUs = append(inv.GPUs, GPU{Index: d.Index, UUID: d.UUID, Minor: minor, Node: d.Node})
	}
	return inv
}

func loadNVML(lib NVML) (*Inventory, error) {
	n, err := lib.DeviceCount()
	if err != nil {
		return nil, err
	}
	inv := &Inventory{Source: SourceNVML, legacy: map[string]string{}}
	for i := 0; i < n; i++ {
		d, err := lib.DeviceByIndex(i)
		if err != nil {
			return nil, fmt.Errorf("GPU %d: %w", i, err)
		}
		g := GPU{Index: i}
		if g.UUID, err = d.UUID(); err != nil {
			return nil, fmt.Errorf("GPU %d: UUID: %w", i, err)
		}
		if g.Minor, err = d.Minor(); err != nil {
			return nil, fmt.Errorf("GPU %d (%s): minor number: %w", i, g.UUID, err)
		}
		g.Node = fmt.Sprintf("/dev/nvidia%d", g.Minor)
		// Name and memory are for people; a GPU that cannot say them is
		// still usable.
		g.Name, _ = d.Name()
		g.MemoryBytes, _ = d.MemoryTotal()
		inv.GPUs = append(inv.GPUs, g)

		migs, err := d.MIGDevices()
		if err != nil {
			return nil, fmt.Errorf("GPU %d (%s): MIG devices: %w", i, g.UUID, err)
		}
		for _, md := range migs {
			m := GPU{Index: i, Minor: g.Minor, Node: g.Node, Parent: g.UUID}
			if m.UUID, err = md.UUID(); err != nil {
				return nil, fmt.Errorf("GPU %d (%s): MIG device UUID: %w", i, g.UUID, err)
			}
			m.Name, _ = md.Name()
			m.MemoryBytes, _ = md.MemoryTotal()
			if gi, ci, err := md.MIGInstance(); err == nil {
				inv.legacy[strings.ToLower(fmt.Sprintf("MIG-%s/%d/%d", g.UUID, gi, ci))] = m.UUID
			}
			inv.GPUs = append(inv.GPUs, m)
		}
	}
	return inv, nil
}

// Resolve maps a pool's Devices= entries to GPUs, in order: an index names
// a whole GPU, a UUID (any case) a GPU or MIG device. A MIG device keeps its
// parent's node: the cgroup opens the whole GPU, CUDA_VISIBLE_DEVICES
// narrows it to the MIG device.
func (inv *Inventory) Resolve(devices []string) ([]GPU, error) {
	out := make([]GPU, 0, len(devices))
	seen := map[string]string{}
	for _, dev := range devices {
		g, ok := inv.lookup(dev)
		if !ok {
			return nil, inv.unknown(dev)
		}
		k := strings.ToLower(g.UUID)
		if prev, dup := seen[k]; dup {
			return nil, fmt.Errorf("GPU %q and %q are the same device (%s): list it once", prev, dev, g.UUID)
		}
		seen[k] = dev
		out = append(out, g)
	}
	return out, nil
}

func (inv *Inventory) lookup(dev string) (GPU, bool) {
	if i, err := strconv.Atoi(dev); err == nil {
		for _, g := range inv.GPUs {
			if g.Index == i && g.Parent == "" {
				return g, true
			}
		}
		return GPU{}, false
	}
	if u, ok := inv.legacy[strings.ToLower(dev)]; ok {
		dev = u
	}
	for _, g := range inv.GPUs {
		if strings.EqualFold(g.UUID, dev) {
			return g, true
		}
	}
	return GPU{}, false
}

func (inv *Inventory) unknown(dev string) error {
	if len(inv.GPUs) == 0 {
		if inv.Fallback != nil {
			return fmt.Errorf("GPU %q: the GPU inventory is empty: no Device= lines, and %w", dev, inv.Fallback)
		}
		return fmt.Errorf("GPU %q: the %s GPU inventory is empty", dev, inv.Source)
	}
	known := make([]string, len(inv.GPUs))
	for i, g := range inv.GPUs {
		if g.Parent != "" {
			known[i] = fmt.Sprintf("%s (MIG on GPU %d)", g.UUID, g.Index)
		} else {
			known[i] = fmt.Sprintf("%d %s (%s)", g.Index, g.UUID, g.Node)
		}
	}
	where := "NVML reports"
	if inv.Source == SourceStatic {
		where = "the static inventory ([Inventory] Device= lines) has"
	}
	return fmt.Errorf("GPU %q is not on this host: %s %s", dev, where, strings.Join(known, ", "))
}

// DeviceNodes is what DeviceAllow= must open for an engine on gpus: each
// GPU's node once, then the control nodes.
func (inv *Inventory) DeviceNodes(gpus []GPU) []string {
	var out []string
	seen := map[string]bool{}
	for _, n := range append(nodes(gpus), inv.Control...) {
		n = path.Clean(n)
		if !seen[n] {
			seen[n] = true
			out = append(out, n)
		}
	}
	return out
}

func nodes(gpus []GPU) []string {
	out := make([]string, len(gpus))
	for i, g := range gpus {
		out[i] = g.Node
	}
	return out
}

// VisibleDevices is the CUDA_VISIBLE_DEVICES (and NVIDIA_VISIBLE_DEVICES)
// value for gpus. UUIDs, not indices: CUDA orders devices differently from
// NVML unless CUDA_DEVICE_ORDER=PCI_BUS_ID, and UUIDs survive reboots.
func VisibleDevices(gpus []GPU) string {
	u := make([]string, len(gpus))
	for i, g := range gpus {
		u[i] = g.UUID
	}
	return strings.Join(u, ",")
}
