package bus

import (
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	api "github.com/llorch/pool-managerd/dbus"
	"github.com/llorch/pool-managerd/internal/lifecycle"
)

// apiErrors reads the error names the API declares (dbus/names.go).
func apiErrors(t *testing.T) []string {
	f, err := parser.ParseFile(token.NewFileSet(), "../../dbus/names.go", nil, 0)
	require.NoError(t, err)
	var out []string
	ast.Inspect(f, func(n ast.Node) bool {
		v, ok := n.(*ast.ValueSpec)
		if !ok || !strings.HasPrefix(v.Names[0].Name, "Err") || v.Names[0].Name == "ErrorPrefix" {
			return true
		}
		b, ok := v.Values[0].(*ast.BinaryExpr)
		require.True(t, ok, "%s is ErrorPrefix + a name", v.Names[0].Name)
		name, err := strconv.Unquote(b.Y.(*ast.BasicLit).Value)
		require.NoError(t, err)
		out = append(out, name)
		return true
	})
	require.NotEmpty(t, out)
	return out
}

// Every error name the API declares is one the daemon answers with, and
// the manual pages that list them name it.
func TestEveryAPIErrorIsAnsweredAndDocumented(t *testing.T) {
	answered := map[string]bool{}
	for _, e := range errorNames {
		answered[e.name] = true
	}
	daemon, err := os.ReadFile("../../packaging/man/pool-managerd.8.md")
	require.NoError(t, err)
	poolctl, err := os.ReadFile("../../packaging/man/poolctl.1.md")
	require.NoError(t, err)
	for _, name := range apiErrors(t) {
		assert.True(t, answered[api.ErrorPrefix+name], "%s is in the API but no error maps to it", name)
		word := regexp.MustCompile(`\b` + name + `\b`)
		assert.True(t, word.Match(daemon), "pool-managerd(8) lists no %s", name)
		assert.True(t, word.Match(poolctl), "poolctl(1) lists no %s", name)
	}
}

// A start refused for want of GPU memory reaches a caller as NoGPUMemory,
// with who holds the memory in the message.
func TestNoGPUMemoryIsItsOwnError(t *testing.T) {
	e := toDBus(fmt.Errorf("pool big did not start: GPU GPU-0 has 2G free of 80G, used by pid 7 (python3, 78G): %w", lifecycle.ErrNoGPUMemory))
	assert.Equal(t, "org.llorch.PoolManager1.Error.NoGPUMemory", e.Name)
	assert.Contains(t, e.Body[0], "used by pid 7 (python3, 78G)")
}

// A start refused because another process holds the pool's GPUs says so
// by its name, as the contract lists it, not as a generic failure.
func TestGPUBusyIsItsOwnError(t *testing.T) {
	e := toDBus(fmt.Errorf("GPU GPU-0 in use by pid 4242 (python3, user.slice): %w", lifecycle.ErrGPUBusy))
	assert.Equal(t, "org.llorch.PoolManager1.Error.GPUBusy", e.Name)
	assert.Contains(t, e.Body[0], "pid 4242 (python3, user.slice)")
}
