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
// or it is lost). It returns the XID's class and, for a hold, why.
func RouteXID[P XIDTarget](uuid string, xid uint64, pools []P) (info gpu.XIDInfo, why string) {
	info = gpu.ClassifyXID(xid)
	switch info.Action {
	case gpu.XIDIgnore:
	case gpu.XIDRestart:
		for _, p := range pools {
			p.XID(uuid, xid)
		}
	default:
		what := "needs a reset"
		if info.Action == gpu.XIDLost {
			what = "is lost"
		}
		why = fmt.Sprintf("GPU %s %s: Xid %d (%s); remedy: %s", uuid, what, xid, info.Meaning, info.RemedyFor(uuid))
		for _, p := range pools {
			p.GPUUnhealthy(uuid, why)
		}
	}
	return info, why
}
