package witness

import (
	"os"
	"testing"

	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
)

const forger = "wt-forger"

func TestMain(m *testing.M) {
	if os.Getenv(hogEnv) != "" {
		hogMain()
	}
	// Without root the pure tests still run; the sandbox tests skip.
	if os.Geteuid() != 0 {
		os.Exit(m.Run())
	}
	os.Exit(sandbox.Main(m, sandbox.Options{Prepare: [][]string{{"useradd", "--no-create-home", forger}}}, nil))
}
