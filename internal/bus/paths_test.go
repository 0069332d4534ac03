package bus

import (
	"encoding/xml"
	"reflect"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/godbus/dbus/v5"
	"github.com/godbus/dbus/v5/introspect"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	shipped "github.com/llorch/pool-managerd/dbus"
	"github.com/llorch/pool-managerd/internal/supervisor"
)

func FuzzPathAndArguments(f *testing.F) {
	for _, s := range []string{"llama8b", "", "a-b", "7b", "\xff\xfe", strings.Repeat("x", 4096), "../x", "a/b"} {
		f.Add(s, uint64(1000))
	}
	f.Fuzz(func(t *testing.T, id string, deadline uint64) {
		if p := shipped.PoolPath(id); !p.IsValid() {
			t.Fatalf("invalid object path %q for %q", p, id)
		}
		if e := checkPoolID(id); e == nil && (id == "" || len(id) > 64 || !utf8.ValidString(id)) {
			t.Fatalf("pool id %q accepted", id)
		}
		if e := checkRef(id); (e == nil) != (len(id) <= MaxRef) {
			t.Fatalf("ref of %d bytes: %v", len(id), e)
		}
		if e := checkDeadline(deadline); (e == nil) != (deadline <= MaxDeadline) {
			t.Fatalf("deadline %d: %v", deadline, e)
		}
	})
}

// A Reload ref longer than PATH_MAX is refused as an invalid argument that
// names the cap, before any pool is looked at.
func TestAReloadRefLongerThanPathMaxIsRefused(t *testing.T) {
	require.Nil(t, checkRef(strings.Repeat("m", MaxRef)))
	e := checkRef(strings.Repeat("m", MaxRef+1))
	require.NotNil(t, e)
	assert.Equal(t, shipped.ErrInvalidArgument, e.Name)
	assert.Contains(t, e.Body[0], "at most 4096 (PATH_MAX)")
}

// Every method of the shipped introspection data is served with the same
// signature: the daemon serves the shipped file, and this keeps the
// handlers honest to it.
func TestShippedInterfaceMatchesHandlers(t *testing.T) {
	var n introspect.Node
	require.NoError(t, xml.Unmarshal([]byte(shipped.Manager), &n))
	require.Len(t, n.Interfaces, 1)
	iface := n.Interfaces[0]
	assert.Equal(t, ManagerIface, iface.Name)
	typ := reflect.TypeOf(&managerObject{})
	senderType := reflect.TypeOf(dbus.Sender(""))
	errType := reflect.TypeOf(&dbus.Error{})
	for _, m := range iface.Methods {
		meth, ok := typ.MethodByName(m.Name)
		require.True(t, ok, "no handler for %s", m.Name)
		var in, out string
		for i := 1; i < meth.Type.NumIn(); i++ {
			if at := meth.Type.In(i); at != senderType {
				in += dbus.SignatureOfType(at).String()
			}
		}
		for i := 0; i < meth.Type.NumOut(); i++ {
			if at := meth.Type.Out(i); at != errType {
				out += dbus.SignatureOfType(at).String()
			}
		}
		var wantIn, wantOut string
		for _, a := range m.Args {
			if a.Direction == "in" {
				wantIn += a.Type
			} else {
				wantOut += a.Type
			}
		}
		assert.Equal(t, wantIn, in, "%s in", m.Name)
		assert.Equal(t, wantOut, out, "%s out", m.Name)
	}

	var pn introspect.Node
	require.NoError(t, xml.Unmarshal([]byte(shipped.Pool), &pn))
	props := properties(supervisor.Snapshot{})
	assert.Len(t, props, len(pn.Interfaces[0].Properties))
	for i, p := range pn.Interfaces[0].Properties {
		if assert.Less(t, i, len(poolProperties)) {
			assert.Equal(t, p.Name, poolProperties[i].name, "served in the interface's order")
		}
		v, ok := props[p.Name]
		require.True(t, ok, "property %s not served", p.Name)
		assert.Equal(t, p.Type, dbus.SignatureOf(v).String(), p.Name)
	}
}
