package supervisor

import (
	"fmt"

	"github.com/llorch/pool-managerd/internal/gpu"
)

// XIDTarget is a pool an XID event reaches: a *Supervisor, or what stands
// for one.
type XIDTarget interface {
	XID(uuid string, xid uint64)
	GPUUnhealthy(uuid, why string)
}

// RouteXID does to the pools on GPU uuid what NVIDIA's XID catalog says of
// xid: nothing (ignore), a restart of each (an application restart clears
// it), or a hold of each until the GPU is usable again (it needs a reset,
// it is lost, or nothing says what it needs). It returns the XID's class
// and, for a hold, why.
func RouteXID[P XIDTarget](uuid string, xid uint64, pools []P) (info gpu.XIDInfo, why string) {
	return RouteXIDInfo(uuid, gpu.ClassifyXID(xid), pools)
}

// RouteXIDInfo is RouteXID for an XID already read (gpu.ReadXID).
func RouteXIDInfo[P XIDTarget](uuid string, info gpu.XIDInfo, pools []P) (gpu.XIDInfo, string) {
	why := ""
	switch info.Action {
	case gpu.XIDIgnore:
	case gpu.XIDRestart:
		for _, p := range pools {
			p.XID(uuid, info.XID)
		}
	default:
		what := "needs a reset"
		switch info.Action {
		case gpu.XIDLost:
			what = "is lost"
		case gpu.XIDHold:
			what = "is held until NVML reports it usable"
		}
		why = fmt.Sprintf("GPU %s %s: Xid %d (%s); remedy: %s", uuid, what, info.XID, info.Meaning, info.RemedyFor(uuid))
		for _, p := range pools {
			p.GPUUnhealthy(uuid, why)
		}
	}
	return info, why
}
