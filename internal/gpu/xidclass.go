package gpu

import (
	"fmt"
	"strings"
)

// XIDAction is what an XID asks of pool-managerd.
type XIDAction int

const (
	// XIDIgnore: the GPU is fine and no application needs restarting
	// (informational, or a consequence of another XID that carries the
	// action).
	XIDIgnore XIDAction = iota
	// XIDRestart: an application restart clears it; the pool restarts
	// (crash reason driver_xid).
	XIDRestart
	// XIDReset: the GPU needs a reset (or the host a reboot) before it
	// is used again.
	XIDReset
	// XIDLost: the GPU fell off the bus or stopped answering (or the
	// driver asks for a reboot of the host).
	XIDLost
	// XIDHold: nothing says what the XID asks (it is not in the table,
	// or the driver does not say): the pools are held until NVML reports
	// the GPU usable, and nothing is reset.
	XIDHold
)

func (a XIDAction) String() string {
	switch a {
	case XIDIgnore:
		return "ignore"
	case XIDRestart:
		return "restart"
	case XIDReset:
		return "reset"
	case XIDLost:
		return "lost"
	case XIDHold:
		return "hold"
	}
	return fmt.Sprintf("XIDAction(%d)", int(a))
}

// XIDInfo is one XID as pool-managerd reads it.
type XIDInfo struct {
	XID     uint64
	Action  XIDAction
	Meaning string // short, after NVIDIA's catalog
	// Remedy is what the operator should do; "<uuid>" stands for the
	// GPU's UUID (RemedyFor fills it in).
	Remedy string
	// Warn: an XIDIgnore worth a warning in the journal.
	Warn bool
	// ProcessTied: the XID is raised by one process's channel (its own
	// fault, e.g. an illegal address), so it acts only on the pool whose
	// scope holds that process. Otherwise it concerns the device and acts
	// on every pool of the GPU.
	ProcessTied bool
}

// RemedyFor is Remedy for the GPU uuid.
func (i XIDInfo) RemedyFor(uuid string) string { return strings.ReplaceAll(i.Remedy, "<uuid>", uuid) }

var xidRemedies = map[XIDAction]string{
	XIDIgnore:  "none: NVIDIA's catalog asks for no action on this XID",
	XIDRestart: "none: the pool restarts; if it recurs, check the engine and its CUDA libraries",
	XIDReset: "drain the GPU's pools, then reset it (nvidia-smi -r -i <uuid>) or reboot the host; " +
		"its pools stay failed until NVML reports it usable or AllowRestart",
	XIDLost: "reboot the host (power-cycle it if the GPU stays lost); if it recurs, check the GPU's seating, riser and power",
	XIDHold: "none if NVML reports the GPU usable again (its pools may start then); if it does not, " +
		"drain the GPU's pools, then reset it (nvidia-smi -r -i <uuid>) or reboot the host",
}

type xidEntry struct {
	action  XIDAction
	meaning string
	remedy  string // "" for the action's usual one
	warn    bool
	// byDriver: the action is in a sub-code or message an NVML event
	// does not carry; ReadXID follows the driver's recovery action
	// instead.
	byDriver bool
	// device: an XIDRestart that concerns the device rather than the
	// process that met it (see processTied).
	device bool
}

// processTied says whether an XID is the fault of the process whose
// channel raised it, and so acts on a pool only when that process is in
// the pool's scope. Any user with a CUDA context on a GPU can raise these
// at will (a faulting kernel gives 13 or 31), so tying them is what keeps
// another user from restarting a pool until its breaker opens.
//
// Process-tied: every XID the catalog answers with RESTART_APP (an
// application restart clears it: the GPU is fine, the application was
// not), but 94, and the application-error XIDs the catalog ignores (43:
// the faulting application's channel was reset; 45: cleanup after a
// process's error or kill).
//
// Device-level: everything that asks for a GPU reset, a reboot or that
// only the driver can read (48 DBE, 74 NVLink, 79 fallen off the bus, 95
// uncontained ECC, 119/120 GSP, 144-150 and 154 recovery action, unknown
// XIDs): the GPU itself is in question, whoever's work met it, and it
// holds every pool on it. 94 (a contained ECC error) is a fault of the
// GPU's memory, which no user causes at will; the row is bad for whoever
// maps it next, so every pool on the GPU restarts.
func processTied(xid uint64, e xidEntry) bool {
	switch {
	case e.action == XIDRestart:
		return !e.device
	case xid == 43 || xid == 45:
		return true
	}
	return false
}

// xidTable follows the "Resolution Bucket (Immediate Action)" column of
// NVIDIA's XID catalog for Ampere and newer GPUs ("Analyzing Xid Errors
// with the Xid Catalog", NVIDIA GPU Deployment and Management
// Documentation, https://docs.nvidia.com/deploy/xid-errors/analyzing-xid-catalog.html;
// for older GPUs the "XID Errors" document,
// https://docs.nvidia.com/deploy/xid-errors/index.html): RESTART_APP is
// XIDRestart, IGNORE XIDIgnore, RESET_GPU XIDReset, RESTART_BM (restart
// the bare-metal host) XIDLost. Where the catalog names a workflow
// instead, the choice is noted beside the entry.
//
// XID 13, 31, 43, 45, 68 (and 109) are what NVIDIA's k8s-device-plugin
// skips as application errors, because it asks whether the device is
// still good for the next pod. pool-managerd asks what to do about the
// engine: every compute process on a pool's GPU is that pool's engine, so
// an XID the catalog answers with RESTART_APP (13, 31, 68) is the engine's
// fault and restarts the pool; 43 and 45 are IGNORE in the catalog as
// well (45 also follows the kill of any process with work on the GPU, our
// own stop of an engine included); 109 is RESET_GPU in the catalog.
var xidTable = map[uint64]xidEntry{
	8:  {action: XIDRestart, meaning: "GPU stopped processing"},
	11: {action: XIDRestart, meaning: "invalid or corrupted push buffer stream"},
	13: {action: XIDRestart, meaning: "graphics engine exception (often an illegal memory access by the application)"},
	25: {action: XIDRestart, meaning: "invalid or illegal push buffer stream"},
	31: {action: XIDRestart, meaning: "GPU memory page fault (often an illegal address in the application)"},
	32: {action: XIDRestart, meaning: "invalid or corrupted push buffer stream"},
	37: {action: XIDIgnore, meaning: "driver firmware error"},
	38: {action: XIDIgnore, meaning: "driver firmware error"},
	39: {action: XIDRestart, meaning: "copy engine exception"},
	40: {action: XIDRestart, meaning: "copy engine exception"},
	41: {action: XIDRestart, meaning: "copy engine exception"},
	43: {action: XIDIgnore, meaning: "GPU stopped processing for the faulting application (its channel was reset; the GPU is fine)"},
	44: {action: XIDIgnore, meaning: "graphics engine fault during context switch"},
	// Catalog: WORKFLOW_XID_45; it follows another XID, which carries the action.
	45: {action: XIDIgnore, meaning: "preemptive cleanup after an earlier error or a killed process"},
	46: {action: XIDReset, meaning: "GPU stopped processing"},
	// Catalog: WORKFLOW_XID_48. An uncorrectable DRAM error: the row is
	// remapped (or the page retired) only at the next reset.
	48: {action: XIDReset, meaning: "double bit ECC error"},
	// Catalog: CHECK_MECHANICALS.
	54: {action: XIDReset, meaning: "auxiliary power is not connected to the GPU board",
		remedy: "drain the GPU's pools, power the host off and connect the board's auxiliary power"},
	60: {action: XIDRestart, meaning: "video processor exception"},
	// Unused on Ampere and newer (CONTACT_SUPPORT); on older GPUs the
	// companion of 62, which carries the reset. DCGM only warns.
	61: {action: XIDIgnore, warn: true, meaning: "internal micro-controller breakpoint/warning",
		remedy: "none: NVIDIA lists it as unused (contact NVIDIA support if it recurs); an XID 62 that follows holds the GPU"},
	62: {action: XIDReset, meaning: "internal micro-controller halt"},
	63: {action: XIDIgnore, meaning: "GPU memory remapping event (applied at the next reset)"},
	64: {action: XIDReset, meaning: "GPU memory remapping failure"},
	66: {action: XIDIgnore, meaning: "illegal access by driver"},
	67: {action: XIDIgnore, meaning: "illegal access by driver"},
	68: {action: XIDRestart, meaning: "NVDEC0 exception"},
	69: {action: XIDRestart, meaning: "graphics engine class error"},
	70: {action: XIDRestart, meaning: "copy engine 3 error"},
	71: {action: XIDRestart, meaning: "copy engine 4 error"},
	72: {action: XIDRestart, meaning: "copy engine 5 error"},
	// Catalog: WORKFLOW_NVLINK_ERR, decided from register bits an NVML
	// event does not carry; held until NVML (the driver's recovery
	// action) reports the GPU usable.
	74:  {action: XIDReset, meaning: "NVLink error"},
	75:  {action: XIDRestart, meaning: "copy engine 6 error"},
	76:  {action: XIDRestart, meaning: "copy engine 7 error"},
	77:  {action: XIDRestart, meaning: "copy engine 8 error"},
	79:  {action: XIDLost, meaning: "GPU has fallen off the bus"},
	80:  {action: XIDRestart, meaning: "corrupted data sent to GPU"},
	82:  {action: XIDRestart, meaning: "NVJPG0 error"},
	83:  {action: XIDRestart, meaning: "NVDEC1 error"},
	84:  {action: XIDRestart, meaning: "NVDEC2 error"},
	85:  {action: XIDRestart, meaning: "copy engine 9 error"},
	86:  {action: XIDRestart, meaning: "OFA exception"},
	88:  {action: XIDRestart, meaning: "NVDEC3 error"},
	89:  {action: XIDRestart, meaning: "NVDEC4 error"},
	92:  {action: XIDIgnore, meaning: "high single-bit ECC error rate"},
	93:  {action: XIDIgnore, meaning: "non-fatal violation of provisioned InfoROM wear limit"},
	94:  {action: XIDRestart, device: true, meaning: "contained memory error (uncorrectable ECC error contained to the application)"},
	95:  {action: XIDReset, meaning: "uncontained memory error"},
	96:  {action: XIDRestart, meaning: "NVDEC5 error"},
	97:  {action: XIDRestart, meaning: "NVDEC6 error"},
	98:  {action: XIDRestart, meaning: "NVDEC7 error"},
	99:  {action: XIDRestart, meaning: "NVJPG1 error"},
	100: {action: XIDRestart, meaning: "NVJPG2 error"},
	101: {action: XIDRestart, meaning: "NVJPG3 error"},
	102: {action: XIDRestart, meaning: "NVJPG4 error"},
	103: {action: XIDRestart, meaning: "NVJPG5 error"},
	104: {action: XIDRestart, meaning: "NVJPG6 error"},
	105: {action: XIDRestart, meaning: "NVJPG7 error"},
	106: {action: XIDIgnore, meaning: "SMBPBI test message"},
	107: {action: XIDIgnore, meaning: "SMBPBI test message (silent)"},
	109: {action: XIDReset, meaning: "context switch timeout"},
	110: {action: XIDReset, meaning: "security fault"},
	119: {action: XIDReset, meaning: "GSP RPC timeout"},
	120: {action: XIDReset, meaning: "GSP error"},
	121: {action: XIDIgnore, meaning: "C2C (chip-to-chip) link error"},
	126: {action: XIDRestart, meaning: "copy engine 10 error"},
	127: {action: XIDRestart, meaning: "copy engine 11 error"},
	128: {action: XIDRestart, meaning: "copy engine 12 error"},
	129: {action: XIDRestart, meaning: "copy engine 13 error"},
	130: {action: XIDRestart, meaning: "copy engine 14 error"},
	131: {action: XIDRestart, meaning: "copy engine 15 error"},
	132: {action: XIDRestart, meaning: "copy engine 16 error"},
	133: {action: XIDRestart, meaning: "copy engine 17 error"},
	134: {action: XIDRestart, meaning: "copy engine 18 error"},
	135: {action: XIDRestart, meaning: "copy engine 19 error"},
	136: {action: XIDReset, meaning: "NVLink link training failed"},
	137: {action: XIDIgnore, meaning: "NVLink privilege error"},
	139: {action: XIDRestart, meaning: "OFA1 error"},
	140: {action: XIDReset, meaning: "unrecovered ECC error"},
	141: {action: XIDIgnore, meaning: "CUDA fast path error"},
	143: {action: XIDReset, meaning: "GPU initialization error"},
	// 144-150, catalog: WORKFLOW_NVLINK5_ERR, RESET_GPU or IGNORE by a
	// sub-code in the kernel's message, which an NVML event does not
	// carry: the driver's recovery action says which (byDriver).
	144: {action: XIDHold, byDriver: true, meaning: "NVLink SAW error"},
	145: {action: XIDHold, byDriver: true, meaning: "NVLink RLW error"},
	146: {action: XIDHold, byDriver: true, meaning: "NVLink TLW error"},
	147: {action: XIDHold, byDriver: true, meaning: "NVLink TREX error"},
	148: {action: XIDHold, byDriver: true, meaning: "NVLink NVLPW_CTRL error"},
	149: {action: XIDHold, byDriver: true, meaning: "NVLink NETIR error"},
	150: {action: XIDHold, byDriver: true, meaning: "NVLink MSE error"},
	// Catalog: RESTART_VM (confidential computing).
	151: {action: XIDReset, meaning: "key rotation error",
		remedy: "drain the GPU's pools, then restart the VM (or reset the GPU: nvidia-smi -r -i <uuid>)"},
	152: {action: XIDIgnore, meaning: "DLA SMMU error"},
	153: {action: XIDIgnore, meaning: "DLA timeout"},
	// Catalog: XID_154; its message names the driver's new recovery
	// action (reset, reboot, drain), which ReadXID reads back from NVML:
	// a reboot is not answered with a reset.
	154: {action: XIDHold, byDriver: true, meaning: "GPU recovery action changed (see nvidia-smi -q, GPU Recovery Action)"},
	155: {action: XIDReset, meaning: "NVLink software-defined error"},
	156: {action: XIDReset, meaning: "resource retirement event (applied at the next reset)"},
	157: {action: XIDIgnore, meaning: "resource retirement failure"},
	158: {action: XIDReset, meaning: "GPU fatal timeout"},
	159: {action: XIDReset, meaning: "uncorrectable GPU error (catalog: RESET_GPU)"},
	160: {action: XIDIgnore, meaning: "channel retirement event"},
	161: {action: XIDIgnore, meaning: "channel retirement failure"},
	167: {action: XIDReset, meaning: "uncorrectable GPU error (catalog: RESET_GPU)"},
	169: {action: XIDReset, meaning: "uncorrectable GPU error (catalog: RESET_GPU)"},
}

// ClassifyXID reads xid by NVIDIA's catalog alone. An XID not in the
// table fails closed: its GPU is held until NVML reports it usable, as
// NVIDIA's device plugin marks a GPU unhealthy on an XID it does not
// know. So is an XID whose action only the driver can name (ReadXID
// asks it).
func ClassifyXID(xid uint64) XIDInfo {
	e, ok := xidTable[xid]
	if !ok {
		return XIDInfo{XID: xid, Action: XIDHold, Meaning: fmt.Sprintf("XID %d (not in pool-managerd's table)", xid),
			Remedy: xidRemedies[XIDHold]}
	}
	r := e.remedy
	if r == "" {
		r = xidRemedies[e.action]
	}
	return XIDInfo{XID: xid, Action: e.action, Meaning: e.meaning, Remedy: r, Warn: e.warn, ProcessTied: processTied(xid, e)}
}

// ReadXID is ClassifyXID for an XID on GPU (or MIG device) uuid, asking
// NVML for the driver's recovery action where the XID's own action is in
// a sub-code or message an NVML event does not carry (144-150, 154): a
// reset is XIDReset, a reboot XIDLost (so nothing resets the GPU), none
// XIDIgnore; anything else, or no answer, holds the GPU (XIDHold). A nil
// n is the host's NVML.
func ReadXID(n NVML, uuid string, xid uint64) XIDInfo {
	info := ClassifyXID(xid)
	if e, ok := xidTable[xid]; !ok || !e.byDriver {
		return info
	}
	switch recoveryAction(n, uuid) {
	case RecoveryNone:
		info.Action, info.Remedy = XIDIgnore, "none: the driver asks for no recovery action"
		info.Meaning += "; the driver asks for nothing"
	case RecoveryReset:
		info.Action, info.Remedy = XIDReset, xidRemedies[XIDReset]
		info.Meaning += "; the driver asks for a GPU reset"
	case RecoveryReboot:
		info.Action = XIDLost
		info.Remedy = "drain the host's pools and reboot it, as the driver's recovery action asks; do not only reset the GPU"
		info.Meaning += "; the driver asks for a reboot of the host"
	}
	return info
}

// recoveryAction asks NVML for the recovery action of uuid's GPU;
// RecoveryUnknown when it cannot say.
func recoveryAction(n NVML, uuid string) RecoveryAction {
	if n == nil {
		n = NewNVML()
	}
	if err := n.Init(); err != nil {
		return RecoveryUnknown
	}
	defer n.Shutdown()
	d, err := n.DeviceByUUID(uuid)
	if err != nil {
		return RecoveryUnknown
	}
	if p, err := d.Parent(); err != nil {
		return RecoveryUnknown
	} else if p != nil {
		d = p
	}
	a, err := d.RecoveryAction()
	if err != nil {
		return RecoveryUnknown
	}
	return a
}
