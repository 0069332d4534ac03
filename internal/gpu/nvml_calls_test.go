//go:build linux && cgo

package gpu

import (
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// nvmlCalls is every go-nvml call the adapter makes and the test that
// drives it through go-nvml's mocks (nvml.New, the real library, runs
// where no driver is).
var nvmlCalls = map[string]string{
	"nvml.New":                           "TestRealNVMLWithoutDriver",
	"Init":                               "TestNVMLThatDoesNotLoad",
	"Shutdown":                           "TestNVMLInventoryFromDGXMocks",
	"DeviceGetCount":                     "TestNVMLInventoryFromDGXMocks",
	"DeviceGetHandleByIndex":             "TestNVMLInventoryFromDGXMocks",
	"DeviceGetHandleByUUID":              "TestNVMLXIDReachesOnlyTheWatchedDevice",
	"EventSetCreate":                     "TestNVMLXIDReachesOnlyTheWatchedDevice",
	"GetUUID":                            "TestNVMLInventoryFromDGXMocks",
	"GetMinorNumber":                     "TestNVMLInventoryFromDGXMocks",
	"GetName":                            "TestNVMLInventoryFromDGXMocks",
	"GetMemoryInfo":                      "TestNVMLInventoryFromDGXMocks",
	"GetMigMode":                         "TestNVMLInventoryFromDGXMocks",
	"GetMaxMigDeviceCount":               "TestNVMLInventoryFromDGXMocks",
	"GetMigDeviceHandleByIndex":          "TestNVMLInventoryFromDGXMocks",
	"IsMigDeviceHandle":                  "TestNVMLXIDReachesOnlyTheWatchedDevice",
	"GetDeviceHandleFromMigDeviceHandle": "TestNVMLXIDReachesOnlyTheWatchedDevice",
	"GetGpuInstanceId":                   "TestNVMLInventoryFromDGXMocks",
	"GetComputeInstanceId":               "TestNVMLInventoryFromDGXMocks",
	"RegisterEvents":                     "TestNVMLXIDReachesOnlyTheWatchedDevice",
	"Wait":                               "TestNVMLWaitErrorsAreReportedAndRetried",
	"Free":                               "TestNVMLXIDReachesOnlyTheWatchedDevice",
	"GetComputeRunningProcesses":         "TestComputeProcessesOfAGPUOrMIGDevice",
	"DeviceGetHandleByPciBusId":          "TestKernelXIDNamesItsGPUByPCI",
	"GetFieldValues":                     "TestUsableAfterAFault",
	"GetRemappedRows":                    "TestUsableAfterAFault",
	"GetRetiredPagesPendingStatus":       "TestUsableAfterAFault",
}

// A go-nvml call added to the adapter fails this test until it is listed
// above with a test that drives it through a mock; a listed call the
// adapter no longer makes fails it too.
func TestEveryNVMLCallHasAMockTest(t *testing.T) {
	methods := map[string]bool{}
	for _, typ := range []reflect.Type{
		reflect.TypeFor[nvml.Interface](), reflect.TypeFor[nvml.Device](), reflect.TypeFor[nvml.EventSet](),
	} {
		for i := range typ.NumMethod() {
			methods[typ.Method(i).Name] = true
		}
	}
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, "nvml_linux_cgo.go", nil, 0)
	require.NoError(t, err)
	found := map[string]bool{}
	ast.Inspect(f, func(n ast.Node) bool {
		call, ok := n.(*ast.CallExpr)
		if !ok {
			return true
		}
		sel, ok := call.Fun.(*ast.SelectorExpr)
		if !ok {
			return true
		}
		if id, ok := sel.X.(*ast.Ident); ok && id.Name == "nvml" {
			found["nvml."+sel.Sel.Name] = true
		} else if methods[sel.Sel.Name] {
			found[sel.Sel.Name] = true
		}
		return true
	})
	var calls, listed []string
	for c := range found {
		calls = append(calls, c)
	}
	for c := range nvmlCalls {
		listed = append(listed, c)
	}
	slices.Sort(calls)
	slices.Sort(listed)
	assert.Equal(t, listed, calls, "go-nvml calls in nvml_linux_cgo.go vs. nvmlCalls")

	tests := map[string]bool{}
	files, err := filepath.Glob("*_test.go")
	require.NoError(t, err)
	for _, name := range files {
		tf, err := parser.ParseFile(fset, name, nil, 0)
		require.NoError(t, err)
		for _, d := range tf.Decls {
			if fn, ok := d.(*ast.FuncDecl); ok && fn.Recv == nil && strings.HasPrefix(fn.Name.Name, "Test") {
				tests[fn.Name.Name] = true
			}
		}
	}
	for c, test := range nvmlCalls {
		assert.True(t, tests[test], "%s: no test %s in this package", c, test)
	}
}
