package dbus

import (
	"os"
	"strings"
	"testing"
)

// The names clients use are the ones the shipped files declare.
func TestNamesAreTheShippedFilesNames(t *testing.T) {
	for _, c := range []struct{ file, want string }{
		{Manager, `<interface name="` + ManagerInterface + `">`},
		{Pool, `<interface name="` + PoolInterface + `">`},
	} {
		if !strings.Contains(c.file, c.want) {
			t.Errorf("introspection data lacks %s", c.want)
		}
	}
	for _, f := range []string{"org.llorch.PoolManager1.conf"} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(b), BusName) {
			t.Errorf("%s does not name %s", f, BusName)
		}
	}
	if !strings.HasPrefix(PoolPathPrefix, ManagerPath+"/") || !strings.HasPrefix(ErrorPrefix, BusName+".") {
		t.Errorf("paths and errors live under the bus name: %s %s", PoolPathPrefix, ErrorPrefix)
	}
}
