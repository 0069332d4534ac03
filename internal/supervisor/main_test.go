package supervisor

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/llorch/pool-managerd/internal/engine"
	"github.com/llorch/pool-managerd/internal/sandbox"
)

// The tests of this package run inside one sandbox with a real systemd;
// the test binary is also the engine shim.
func TestMain(m *testing.M) {
	if engine.IsShim() {
		os.Exit(engine.Shim())
	}
	os.Exit(sandbox.Main(m, sandbox.Options{
		Nodes:   sandbox.FakeGPUs,
		Prepare: [][]string{{"useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "pool-engine"}},
	}, buildSim))
}

// buildSim builds the engine simulator outside, for the tests inside.
func buildSim() ([]string, []string, func(), error) {
	dir, err := os.MkdirTemp("", "pool-sim-")
	if err != nil {
		return nil, nil, nil, err
	}
	cleanup := func() { os.RemoveAll(dir) }
	// The engine user must reach the binary.
	os.Chmod(dir, 0o755)
	out, err := exec.Command("go", "build", "-o", dir, "github.com/llorch/pool-managerd/cmd/pool-engine-sim").CombinedOutput()
	if err != nil {
		return nil, nil, cleanup, fmt.Errorf("building the simulator: %v: %s", err, out)
	}
	return []string{"POOL_ENGINE_SIM=" + filepath.Join(dir, "pool-engine-sim")}, []string{dir}, cleanup, nil
}
