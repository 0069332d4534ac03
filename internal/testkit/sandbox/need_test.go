package sandbox

import (
	"fmt"
	"runtime"
	"testing"

	"github.com/stretchr/testify/assert"
)

// needTB records how Need ended a test; its Fatal and Skip end the test's
// goroutine as testing.T's do.
type needTB struct {
	fatal, skip string
	ran         bool
}

func (n *needTB) Helper()           {}
func (n *needTB) Fatal(args ...any) { n.fatal = fmt.Sprint(args...); runtime.Goexit() }
func (n *needTB) Skip(args ...any)  { n.skip = fmt.Sprint(args...); runtime.Goexit() }

func runNeed() needTB {
	var n needTB
	done := make(chan struct{})
	go func() {
		defer close(done)
		Need(&n)
		n.ran = true
	}()
	<-done
	return n
}

// Outside a sandbox a test that needs one skips, and fails with CI set;
// inside it runs.
func TestNeedSkipsOutsideFailsWithCIAndRunsInside(t *testing.T) {
	t.Setenv(InsideEnv, "")
	t.Setenv("CI", "")
	n := runNeed()
	assert.False(t, n.ran)
	assert.Empty(t, n.fatal)
	assert.Contains(t, n.skip, "needs root")

	t.Setenv("CI", "true")
	n = runNeed()
	assert.False(t, n.ran)
	assert.Empty(t, n.skip)
	assert.Contains(t, n.fatal, "CI is set")

	t.Setenv(InsideEnv, "1")
	n = runNeed()
	assert.True(t, n.ran)
	assert.Empty(t, n.skip)
	assert.Empty(t, n.fatal)
}
