package dbus

import (
	"os"
	"testing"

	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
)

// systemd is the reference for the path codec: as root the tests also run
// against a real one, in a sandbox.
func TestMain(m *testing.M) {
	os.Exit(sandbox.Main(m, sandbox.Options{}, nil))
}
