package config

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// ScopeProperty is one [Scope] key, parsed into the transient-unit property
// systemd's StartTransientUnit takes.
type ScopeProperty struct {
	// Key and Raw are as written in the file.
	Key, Raw string
	// Name is the D-Bus property name, Value its value (uint64 or string).
	Name  string
	Value any
}

type scopeKey struct {
	parse func(string) (any, error)
	// dbus is the property name when it differs from the key.
	dbus string
}

var scopeKeys = map[string]scopeKey{
	"MemoryMax":     {parse: parseBytes},
	"MemoryHigh":    {parse: parseBytes},
	"MemoryLow":     {parse: parseBytes},
	"MemoryMin":     {parse: parseBytes},
	"MemorySwapMax": {parse: parseBytes},
	"TasksMax":      {parse: parseLimit},
	"CPUWeight":     {parse: weight(1, 10000)},
	"IOWeight":      {parse: weight(1, 10000)},
	"CPUQuota":      {parse: parseQuota, dbus: "CPUQuotaPerSecUSec"},
	// The scope's cgroup is given to the engine's user (pool-managerd
	// chowns it: systemd does not for a scope), so that a container
	// engine can split it (podman run --cgroups=split). A list of
	// controllers is not taken: the scope's own controllers stay
	// systemd's.
	"Delegate": {parse: func(v string) (any, error) { return parseBool(v) }},
	"OOMPolicy": {parse: func(v string) (any, error) {
		switch v {
		case "continue", "stop", "kill":
			return v, nil
		}
		return nil, fmt.Errorf("%q is not continue, stop or kill", v)
	}},
}

// Keys pool-managerd sets itself; letting a file change them would break
// the pool's isolation or supervision.
var ownedScopeKeys = map[string]string{
	"DevicePolicy": "device access is derived from Devices=",
	"DeviceAllow":  "device access is derived from Devices=",
	"Slice":        "engines always run in pool-managerd-engines.slice",
	"KillMode":     "stopping an engine always kills its whole scope",
	"User":         "set User= in [Engine]",
}

func parseScopeProperty(key, value string) (ScopeProperty, error) {
	if why, ok := ownedScopeKeys[key]; ok {
		return ScopeProperty{}, fmt.Errorf("set by pool-managerd, not configurable: %s", why)
	}
	k, ok := scopeKeys[key]
	if !ok {
		return ScopeProperty{}, fmt.Errorf("unsupported [Scope] key (supported: CPUQuota CPUWeight Delegate IOWeight MemoryHigh MemoryLow MemoryMax MemoryMin MemorySwapMax OOMPolicy TasksMax)")
	}
	v, err := k.parse(value)
	if err != nil {
		return ScopeProperty{}, err
	}
	name := key
	if k.dbus != "" {
		name = k.dbus
	}
	return ScopeProperty{Key: key, Raw: value, Name: name, Value: v}, nil
}

// parseBytes reads a size like systemd: bytes with an optional K, M, G or
// T suffix (base 1024), or "infinity".
func parseBytes(v string) (any, error) {
	if v == "infinity" {
		return uint64(math.MaxUint64), nil
	}
	mult := uint64(1)
	num := v
	if n := len(v); n > 0 {
		switch v[n-1] {
		case 'K':
			mult = 1 << 10
		case 'M':
			mult = 1 << 20
		case 'G':
			mult = 1 << 30
		case 'T':
			mult = 1 << 40
		}
		if mult > 1 {
			num = v[:n-1]
		}
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil || f < 0 || math.IsNaN(f) || f*float64(mult) >= math.MaxUint64/2 || strings.ContainsAny(num, "eExX+-") {
		return nil, fmt.Errorf("%q is not a size (bytes with an optional K, M, G or T suffix, or infinity)", v)
	}
	return uint64(f * float64(mult)), nil
}

func parseLimit(v string) (any, error) {
	if v == "infinity" {
		return uint64(math.MaxUint64), nil
	}
	n, err := parseInt(v, 1, math.MaxInt64)
	if err != nil {
		return nil, fmt.Errorf("%w (a count or infinity)", err)
	}
	return uint64(n), nil
}

func weight(lo, hi int64) func(string) (any, error) {
	return func(v string) (any, error) {
		n, err := parseInt(v, lo, hi)
		if err != nil {
			return nil, err
		}
		return uint64(n), nil
	}
}

// parseQuota turns "200%" into CPU time per second in microseconds.
func parseQuota(v string) (any, error) {
	p, ok := strings.CutSuffix(v, "%")
	if !ok {
		return nil, fmt.Errorf("%q is not a percentage (e.g. 200%%)", v)
	}
	f, err := parseFloat(p, 1, 100000)
	if err != nil {
		return nil, err
	}
	return uint64(f * 10000), nil
}
