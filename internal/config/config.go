// Package config reads pool-managerd's configuration: the manager file and
// one *.pool file per pool, in systemd unit syntax. Validation is strict and
// complete: every problem is reported at once, each naming its file, line,
// section and key, and a configuration with any problem is refused whole.
package config

import (
	"cmp"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/llorch/pool-managerd/internal/crash"
	"github.com/llorch/pool-managerd/internal/policy"
)

// Default locations on an installed host.
const (
	DefaultDir   = "/etc/pool-managerd"
	ManagerFile  = "pool-managerd.conf"
	PoolsDir     = "pools.d"
	PoolSuffix   = ".pool"
	DefaultGroup = "pool-admin"
	// EngineGroup is the group every engine is also in (sysusers makes
	// it): a model shared with it is readable by every pool.
	EngineGroup = "pool-engine"
)

// UIDRange is a closed range of uids, EngineUIDs=.
type UIDRange struct{ First, Last uint32 }

// DefaultEngineUIDs is where each pool's own user comes from: above the
// 16-bit uids (regular users, systemd-homed, DynamicUser=) and below the
// subordinate uids useradd hands out (100000 on) and systemd's container
// ranges (524288 on).
var DefaultEngineUIDs = UIDRange{First: 65536, Last: 99999}

// Config is a whole, valid configuration.
type Config struct {
	// Dir is the configuration directory it was loaded from ("" when
	// loaded from a list of files): where persistent drop-ins go.
	Dir     string
	Manager Manager
	// Pools are sorted by id.
	Pools []*Pool
}

// Manager holds the [Manager] and [Inventory] settings.
type Manager struct {
	File       string
	StateDir   string
	RuntimeDir string
	// CacheDir holds one writable directory per pool, CacheDir/ID, owned
	// by the pool's User=: the engine's HOME and caches.
	CacheDir  string
	ModelsDir string
	// ModelDirs are further directories that absolute model refs from the
	// bus may resolve beneath (ModelsDir always may).
	ModelDirs       []string
	MetricsTextfile string // empty: no textfile
	MetricsInterval time.Duration
	MetricsListen   string // empty: no listener
	AdminGroup      string
	// EngineUIDs is where the engines of pools without User= get a user of
	// their own (uid and gid), one per pool.
	EngineUIDs UIDRange
	Inventory  Inventory
}

// Backend selects where the GPU inventory comes from.
type Backend string

const (
	BackendAuto   Backend = "auto"
	BackendNVML   Backend = "nvml"
	BackendStatic Backend = "static"
)

// Inventory is the [Inventory] section.
type Inventory struct {
	Backend        Backend
	Devices        []StaticDevice
	ControlDevices []string
	// GPUResetCommand, when set, is run as root for a GPU that needs a
	// reset, once every pool on it has stopped; %g is the GPU's UUID
	// (appended when absent).
	GPUResetCommand []string
}

// StaticDevice is one Device= line: a GPU known without NVML.
type StaticDevice struct {
	Index int
	UUID  string
	Node  string
}

// Pool is one *.pool file.
type Pool struct {
	ID   string
	File string
	// DropIns are the drop-ins applied after File, in the order applied.
	DropIns []string

	Description string
	// Devices are the Devices= entries as written: NVML indices, GPU UUIDs
	// or MIG UUIDs.
	Devices     []string
	Model       string
	ModelDigest string // "sha256:<hex>" or empty
	Slots       uint32 // 0: no limit
	AutoStart   bool
	// IdleStop: a ready pool unused this long has its engine stopped
	// (idle); 0 (and Pin) never. StartOnLease: a lease on an idle pool
	// starts it.
	IdleStop     time.Duration
	Pin          bool
	StartOnLease bool
	// Group names the pools that share their GPUs and take turns on them,
	// one awake at a time ("": none). GroupDrain is how long the awake
	// member's leases are honoured when another member is asked for.
	Group      string
	GroupDrain time.Duration
	// devicesAt is where Devices= was last set ("file:line"), for the
	// errors of the shared-GPU rule.
	devicesAt string
	// MemoryRequired is the GPU memory a start needs free, in bytes, over
	// the pool's GPUs (0: not checked); nil: the model's size times 1.2.
	MemoryRequired *uint64

	Engine  Engine
	Health  Health
	Restart policy.Params
	Scope   []ScopeProperty
}

// DefaultGroupDrain is GroupDrainSec= where it is not set.
const DefaultGroupDrain = 30 * time.Second

// SameSettings says whether two pools differ only in what the manager
// applies without a new supervisor: AutoStart=, Group=, GroupDrainSec=,
// where their lines are and which drop-ins set them.
func SameSettings(a, b *Pool) bool {
	x, y := *a, *b
	for _, p := range []*Pool{&x, &y} {
		p.AutoStart, p.DropIns, p.Group, p.GroupDrain, p.devicesAt = false, nil, "", 0, ""
	}
	return reflect.DeepEqual(&x, &y)
}

// DeviceIDs is how the engine's CUDA_VISIBLE_DEVICES names its GPUs.
type DeviceIDs string

const (
	// DeviceIDsUUID names them by GPU or MIG UUID.
	DeviceIDsUUID DeviceIDs = "uuid"
	// DeviceIDsIndex names them by NVML index, with
	// CUDA_DEVICE_ORDER=PCI_BUS_ID so that CUDA numbers them as NVML
	// does: for engines that refuse UUIDs (some vLLM versions).
	DeviceIDsIndex DeviceIDs = "index"
)

// Engine is the [Engine] section. String fields keep their specifiers;
// expand them with Pool.Specifiers once the model is staged.
type Engine struct {
	ExecStart []string
	Port      int // 0: none
	HealthURL string
	// User is the engine's user by name; empty: a user of the pool's own,
	// allocated from EngineUIDs=.
	User           string
	DeviceIDs      DeviceIDs
	Environment    []string // NAME=value
	StopTimeout    time.Duration
	Version        string
	VersionCommand []string
	// Sleep: how idleness rests the engine: SleepNone stops it, SleepVLLM
	// asks it to sleep at SleepLevel (1 or 2) on its Port.
	Sleep      Sleep
	SleepLevel int
}

// Sleep is [Engine] Sleep=.
type Sleep string

const (
	// SleepNone: an idle pool's engine is stopped.
	SleepNone Sleep = "none"
	// SleepVLLM: an idle pool's engine is put to sleep with vLLM's
	// POST /sleep?level=N and woken with POST /wake_up.
	SleepVLLM Sleep = "vllm"
)

// Health is the [Health] section.
type Health struct {
	Interval         time.Duration
	Timeout          time.Duration
	FailureThreshold int
	StartTimeout     time.Duration
	// ProgressURL is the engine's Prometheus endpoint (with specifiers);
	// with Stall, requests in flight and no token for that long is a
	// stall. Both unset: no stall detection.
	ProgressURL string
	Stall       time.Duration
	// Warmup is the request that must succeed before the pool is Ready
	// (nil: none), within WarmupTimeout.
	Warmup        *WarmupRequest
	WarmupTimeout time.Duration
	// Canary is a request (WarmupRequest='s syntax) sent to a Ready
	// engine idle for CanaryIdle (nil: none): an engine whose generation
	// broke while its /health still answers fails it. CanaryTimeout
	// bounds it (0: DefaultCanaryTimeout).
	Canary        *WarmupRequest
	CanaryIdle    time.Duration
	CanaryTimeout time.Duration
}

// DefaultCanaryTimeout bounds a canary request where CanaryTimeoutSec= is
// not set: shorter than the warm-up's default, since a warm engine has
// nothing left to load or compile.
const DefaultCanaryTimeout = 30 * time.Second

// WarmupRequest is [Health] WarmupRequest=: METHOD /path [body].
type WarmupRequest struct {
	Method, Path, Body string
}

// Specifiers returns the specifier values for the pool with the given
// staged model path.
func (p *Pool) Specifiers(model string) Specifiers {
	port := ""
	if p.Engine.Port > 0 {
		port = fmt.Sprint(p.Engine.Port)
	}
	// Without the inventory %d can only be Devices= as written; the
	// supervisor sets it to the engine's CUDA_VISIBLE_DEVICES.
	return Specifiers{ID: p.ID, Model: model, Port: port, Devices: strings.Join(p.Devices, ",")}
}

// DefaultManager is the manager configuration when no file exists.
func DefaultManager() Manager {
	return Manager{
		StateDir:        "/var/lib/pool-managerd",
		RuntimeDir:      "/run/pool-managerd",
		CacheDir:        "/var/cache/pool-managerd",
		ModelsDir:       "/var/lib/pool-managerd/models",
		MetricsTextfile: "/var/lib/prometheus/node-exporter/pool-managerd.prom",
		MetricsInterval: 15 * time.Second,
		AdminGroup:      DefaultGroup,
		EngineUIDs:      DefaultEngineUIDs,
		Inventory:       Inventory{Backend: BackendAuto},
	}
}

func defaultPool(id, file string) *Pool {
	return &Pool{
		ID:         id,
		File:       file,
		AutoStart:  true,
		GroupDrain: DefaultGroupDrain,
		Engine:     Engine{DeviceIDs: DeviceIDsUUID, StopTimeout: 30 * time.Second, Sleep: SleepNone, SleepLevel: 1},
		Health: Health{
			Interval:         5 * time.Second,
			Timeout:          2 * time.Second,
			FailureThreshold: 3,
			StartTimeout:     120 * time.Second,
			WarmupTimeout:    60 * time.Second,
		},
		Restart: policy.Defaults(),
	}
}

// Load reads DIR/pool-managerd.conf (optional), then its drop-ins
// DIR/pool-managerd.conf.d/*.conf in name order (later ones override, as
// with systemd's), and DIR/pools.d/*.pool, each with its drop-ins (see
// PoolDropIns) from DIR/pools.d and RuntimeDir/pools.d.
func Load(dir string) (*Config, error) {
	return LoadRuntime(dir, "")
}

// LoadRuntime is Load with the runtime drop-ins read from beneath
// runtimeDir, the running daemon's RuntimeDir= ("": the one the manager
// file names).
func LoadRuntime(dir, runtimeDir string) (*Config, error) {
	pools, err := filepath.Glob(filepath.Join(dir, PoolsDir, "*"+PoolSuffix))
	if err != nil {
		return nil, err
	}
	var mgr []string
	if _, err := os.Stat(filepath.Join(dir, ManagerFile)); err == nil {
		mgr = append(mgr, filepath.Join(dir, ManagerFile))
	}
	dropIns, _ := filepath.Glob(filepath.Join(dir, ManagerFile+".d", "*.conf"))
	mgr = append(mgr, dropIns...)
	if _, err := os.Stat(filepath.Join(dir, PoolsDir)); err != nil && len(mgr) == 0 {
		return nil, fmt.Errorf("%s: no %s and no %s/ directory: is this a pool-managerd configuration directory?", dir, ManagerFile, PoolsDir)
	}
	var errs Errors
	for _, d := range []string{filepath.Join(dir, PoolsDir), filepath.Join(dir, ManagerFile+".d")} {
		if e := checkDir(d); e != nil {
			errs = append(errs, e)
		}
	}
	c, err := loadFiles(mgr, pools, func(m *Manager) []string {
		return []string{filepath.Join(dir, PoolsDir), filepath.Join(cmp.Or(runtimeDir, m.RuntimeDir), PoolsDir)}
	})
	if len(errs) > 0 {
		if fe, ok := err.(Errors); ok {
			errs = append(errs, fe...)
		} else if err != nil {
			return nil, err
		}
		return nil, errs
	}
	if c != nil {
		c.Dir = dir
	}
	return c, err
}

// LoadFiles reads the given manager files in order (none: defaults) and
// pool files, without drop-ins. A file that others than root may write is
// refused.
func LoadFiles(managerFiles []string, poolFiles []string) (*Config, error) {
	return loadFiles(managerFiles, poolFiles, nil)
}

// loadFiles is LoadFiles with each pool's drop-ins read from beneath the
// directories dropInDirs returns for the manager settings read.
func loadFiles(managerFiles []string, poolFiles []string, dropInDirs func(*Manager) []string) (*Config, error) {
	var errs Errors
	c := &Config{Manager: DefaultManager()}
	for _, f := range managerFiles {
		c.Manager.File = f
		data, err := readTrusted(f)
		if err != nil {
			errs = append(errs, &Error{File: f, Msg: err.Error()})
		} else {
			errs = append(errs, parseManager(f, data, &c.Manager)...)
		}
	}
	var bases []string
	if dropInDirs != nil {
		bases = dropInDirs(&c.Manager)
	}
	seen := map[string]string{}
	sources := map[string][]byte{}
	for _, f := range poolFiles {
		id := strings.TrimSuffix(filepath.Base(f), PoolSuffix)
		if prev, dup := seen[id]; dup {
			errs = append(errs, &Error{File: f, Msg: fmt.Sprintf("duplicate pool id %q: already defined by %s", id, prev)})
			continue
		}
		seen[id] = f
		data, err := readTrusted(f)
		if err != nil {
			errs = append(errs, &Error{File: f, Msg: err.Error()})
			continue
		}
		dis, derrs := readDropIns(id, bases)
		errs = append(errs, derrs...)
		sources[f] = data
		p, perrs := parsePool(f, data, dis)
		errs = append(errs, perrs...)
		if p != nil {
			c.Pools = append(c.Pools, p)
		}
	}
	sort.Slice(c.Pools, func(i, j int) bool { return c.Pools[i].ID < c.Pools[j].ID })
	errs = append(errs, c.checkDevices()...)
	errs = append(errs, c.checkPorts()...)
	for f, data := range sources {
		errs = withLines(errs, f, data)
	}
	if len(errs) > 0 {
		return nil, errs
	}
	return c, nil
}

// staticApplies says whether Devices= entries can be checked against the
// static inventory now: NVML is only known at run time.
func (m *Manager) staticApplies() bool {
	return m.Inventory.Backend == BackendStatic ||
		m.Inventory.Backend == BackendAuto && len(m.Inventory.Devices) > 0
}

// checkDevices finds GPUs shared outside a group (by index or UUID alike
// when the static inventory relates them) and entries the inventory lacks.
func (c *Config) checkDevices() Errors {
	var errs Errors
	// Without a static inventory only the names as written are known: the
	// daemon (and CheckHost) check again on NVML's.
	ident := func(d string) (GPUInfo, bool) { return GPUInfo{UUID: d}, false }
	known := func(string) bool { return true }
	canon := func(d string) string { return d }
	if c.Manager.staticApplies() {
		// Each node is listed once: the static inventory relates no MIG
		// device to its GPU.
		byKey := map[string]string{}
		for _, d := range c.Manager.Inventory.Devices {
			byKey[fmt.Sprint(d.Index)] = d.UUID
			byKey[strings.ToLower(d.UUID)] = d.UUID
		}
		known = func(d string) bool { _, ok := byKey[strings.ToLower(d)]; return ok }
		canon = func(d string) string { return cmp.Or(byKey[strings.ToLower(d)], d) }
		ident = func(d string) (GPUInfo, bool) { return GPUInfo{UUID: canon(d)}, known(d) }
	}
	var pools []*Pool
	for _, p := range c.Pools {
		bad := false
		for _, d := range p.Devices {
			if !known(d) {
				bad = true
				errs = append(errs, &Error{File: p.File, Section: "Pool", Key: "Devices",
					Msg: fmt.Sprintf("GPU %q is not in the static inventory (Device= lines of [Inventory] in %s)", d, orDefault(c.Manager.File))})
				continue
			}
			if u := canon(d); p.Engine.DeviceIDs == DeviceIDsIndex && !isMIG(d) && isMIG(u) {
				errs = append(errs, &Error{File: p.File, Section: "Engine", Key: "DeviceIDs",
					Msg: fmt.Sprintf("index: GPU %q is MIG device %s in the static inventory, which has no index CUDA_VISIBLE_DEVICES can name (set DeviceIDs=uuid)", d, u)})
			}
		}
		if !bad {
			pools = append(pools, p)
		}
	}
	return append(errs, CheckSharedGPUs(pools, ident)...)
}

// CheckSharedGPUs holds pools to the rule of shared GPUs: two pools may
// name one GPU (or a GPU and a MIG device on it) only with the same
// Group=, and the members of a group name the same GPUs. ident says what
// a Devices= entry is on the inventory at hand, and whether that is known
// (not only the name as written: then two members' sets are not
// compared). Errors name both pools' files and lines.
func CheckSharedGPUs(pools []*Pool, ident func(dev string) (GPUInfo, bool)) Errors {
	type dev struct {
		name  string
		gpu   GPUInfo
		known bool
	}
	devs := make([][]dev, len(pools))
	for i, p := range pools {
		for _, d := range p.Devices {
			g, ok := ident(d)
			devs[i] = append(devs[i], dev{d, g, ok})
		}
	}
	// why says how b, of a later pool, is on a's GPU ("" when it is not).
	why := func(a, b dev, prev *Pool, at string) string {
		switch {
		case strings.EqualFold(a.gpu.UUID, b.gpu.UUID) && strings.EqualFold(a.name, b.name):
			return fmt.Sprintf("GPU %q is already used by pool %q (%s)", b.name, prev.ID, at)
		case strings.EqualFold(a.gpu.UUID, b.gpu.UUID):
			return fmt.Sprintf("GPU %q is %s, which pool %q names %q (%s)", b.name, b.gpu.UUID, prev.ID, a.name, at)
		case b.gpu.Parent != "" && strings.EqualFold(a.gpu.UUID, b.gpu.Parent):
			return fmt.Sprintf("GPU %q is a MIG device of %s, which pool %q takes whole as %q (%s)", b.name, b.gpu.Parent, prev.ID, a.name, at)
		case a.gpu.Parent != "" && strings.EqualFold(a.gpu.Parent, b.gpu.UUID):
			return fmt.Sprintf("GPU %q is %s, whose MIG device %q pool %q uses (%s)", b.name, b.gpu.UUID, a.name, prev.ID, at)
		}
		return ""
	}
	set := func(ds []dev) (string, bool) {
		ks := make([]string, len(ds))
		for i, d := range ds {
			if !d.known {
				return "", false
			}
			ks[i] = strings.ToLower(d.gpu.UUID)
		}
		slices.Sort(ks)
		return strings.Join(ks, " "), true
	}
	place := func(p *Pool) (string, int) {
		i := strings.LastIndexByte(p.devicesAt, ':')
		if i < 0 {
			return p.File, 0
		}
		n, _ := strconv.Atoi(p.devicesAt[i+1:])
		return p.devicesAt[:i], n
	}
	var errs Errors
	first := map[string]int{} // a group's first member, by name
	for j, q := range pools {
		file, line := place(q)
		fail := func(msg string) {
			errs = append(errs, &Error{File: file, Line: line, Section: "Pool", Key: "Devices", Msg: msg})
		}
		if q.Group != "" {
			if i, ok := first[q.Group]; !ok {
				first[q.Group] = j
			} else {
				a, aok := set(devs[i])
				b, bok := set(devs[j])
				if aok && bok && a != b {
					pf, pl := place(pools[i])
					fail(fmt.Sprintf("%s names other GPUs than pool %q of Group=%s (%s:%d: %s): the members of a group name the same GPUs",
						strings.Join(q.Devices, " "), pools[i].ID, q.Group, pf, pl, strings.Join(pools[i].Devices, " ")))
					continue
				}
			}
		}
	pairs:
		for i, p := range pools[:j] {
			if p.Group != "" && p.Group == q.Group {
				continue
			}
			pf, pl := place(p)
			for _, a := range devs[i] {
				for _, b := range devs[j] {
					if w := why(a, b, p, fmt.Sprintf("%s:%d", pf, pl)); w != "" {
						fail(w + ": pools share a GPU only with the same Group= (a GPU belongs to one pool otherwise)")
						break pairs
					}
				}
			}
		}
	}
	return errs
}

func orDefault(f string) string {
	if f == "" {
		return "the manager file"
	}
	return f
}

// Reasons used by Multiplier=, for error messages.
func reasonList() string {
	s := make([]string, len(crash.Reasons))
	for i, r := range crash.Reasons {
		s[i] = string(r)
	}
	return strings.Join(s, ", ")
}
