//go:build !linux || !cgo

package gpu

import "errors"

// NewNVML returns an NVML that never initialises: go-nvml needs cgo and
// dlopen, so a build without them has only the static inventory.
func NewNVML() NVML { return noNVML{} }

var errNoCgo = errors.New("NVML: this pool-managerd was built without cgo and cannot load libnvidia-ml; use [Inventory] Backend=static with Device= lines")

type noNVML struct{}

func (noNVML) Init() error                         { return errNoCgo }
func (noNVML) Shutdown() error                     { return errNoCgo }
func (noNVML) DeviceCount() (int, error)           { return 0, errNoCgo }
func (noNVML) DeviceByIndex(int) (Device, error)   { return nil, errNoCgo }
func (noNVML) DeviceByUUID(string) (Device, error) { return nil, errNoCgo }
func (noNVML) DeviceByPCI(string) (Device, error)  { return nil, errNoCgo }
func (noNVML) NewEventSet() (EventSet, error)      { return nil, errNoCgo }
