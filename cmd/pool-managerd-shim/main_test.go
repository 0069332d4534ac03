package main

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The shim is on the path of every restart: it must stay a static binary
// that loads no C library, resolver or NSS module before the engine runs.
func TestShimLinksNoCgo(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	require.NoError(t, err)
	deps := strings.Fields(string(out))
	require.Contains(t, deps, "github.com/llorch/pool-managerd/internal/shim")
	for _, heavy := range []string{"runtime/cgo", "net", "os/user", "github.com/godbus/dbus/v5", "github.com/prometheus/client_golang/prometheus"} {
		assert.NotContains(t, deps, heavy)
	}
}

func TestRefusesToRunByHand(t *testing.T) {
	out, err := exec.Command("go", "run", ".").CombinedOutput()
	require.Error(t, err)
	assert.Contains(t, string(out), "not meant to be run by hand")
}
