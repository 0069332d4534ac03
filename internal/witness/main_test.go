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
	os.Exit(sandbox.Main(m, sandbox.Options{Prepare: [][]string{{"useradd", "--no-create-home", forger}}}, nil))
}
