package dbus

// Names of the API on the bus, shared by the daemon and its clients.
const (
	BusName          = "org.llorch.PoolManager1"
	ManagerPath      = "/org/llorch/PoolManager1"
	PoolPathPrefix   = "/org/llorch/PoolManager1/pool"
	ManagerInterface = "org.llorch.PoolManager1.Manager"
	PoolInterface    = "org.llorch.PoolManager1.Pool"
	ErrorPrefix      = "org.llorch.PoolManager1.Error."
)

// The errors the daemon answers with, which scripts match on.
const (
	ErrNoSuchPool       = ErrorPrefix + "NoSuchPool"
	ErrInvalidArgument  = ErrorPrefix + "InvalidArgument"
	ErrNotReady         = ErrorPrefix + "NotReady"
	ErrDraining         = ErrorPrefix + "Draining"
	ErrBusy             = ErrorPrefix + "Busy"
	ErrNoCapacity       = ErrorPrefix + "NoCapacity"
	ErrNoSuchLease      = ErrorPrefix + "NoSuchLease"
	ErrDrainTimeout     = ErrorPrefix + "DrainTimeout"
	ErrReloadFailed     = ErrorPrefix + "ReloadFailed"
	ErrBreakerOpen      = ErrorPrefix + "BreakerOpen"
	ErrGPUUnhealthy     = ErrorPrefix + "GPUUnhealthy"
	ErrNoRestartPending = ErrorPrefix + "NoRestartPending"
)
