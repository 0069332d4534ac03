// Command pool-managerd-shim is the parent of one engine inside its
// systemd scope. pool-managerd starts it; it is not meant to be run by hand.
// It links only the shim, so it starts fast (it is on the path of every
// engine restart) and stays small while the engine runs.
package main

import (
	"fmt"
	"os"

	"github.com/llorch/pool-managerd/internal/shim"
)

func main() {
	if !shim.Is() {
		fmt.Fprintln(os.Stderr, "pool-managerd-shim: started by pool-managerd for each engine; not meant to be run by hand")
		os.Exit(2)
	}
	os.Exit(shim.Main())
}
