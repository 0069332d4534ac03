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
	"github.com/llorch/pool-managerd/internal/config"
	"github.com/llorch/pool-managerd/internal/supervisor"
	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
)

// sdBusLabelEscape is systemd's bus_label_escape, which sd_bus_path_encode
// applies to the element it appends, written out byte for byte.
func sdBusLabelEscape(s string) string {
	if s == "" {
		return "_"
	}
	const hex = "0123456789abcdef"
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		alpha := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'
		digit := c >= '0' && c <= '9'
		if !alpha && !(i > 0 && digit) {
			b.WriteByte('_')
			b.WriteByte(hex[c>>4])
			b.WriteByte(hex[c&15])
		} else {
			b.WriteByte(c)
		}
	}
	return b.String()
}

func TestPathEncodeLikeSystemd(t *testing.T) {
	// Values as sd_bus_path_encode gives them.
	for in, want := range map[string]string{
		"llama8b":  "llama8b",
		"llama-8b": "llama_2d8b",
		"a_b":      "a_5fb",
		"":         "_",
		"7b":       "_37b",
		"0":        "_30",
		"b7":       "b7",
		"-7":       "_2d7",
		"é":        "_c3_a9",
	} {
		assert.Equal(t, want, PathEncode(in), in)
		assert.Equal(t, want, sdBusLabelEscape(in), "the reference agrees: %s", in)
		assert.Equal(t, dbus.ObjectPath(PoolPrefix+"/"+want), PoolPath(in), in)
	}
	assert.True(t, dbus.ObjectPath(PoolPath("a-b_c")).IsValid())
}

// systemd itself is the reference: a unit's object path is its name put
// through sd_bus_path_encode.
func TestPathEncodeMatchesSystemdUnitPaths(t *testing.T) {
	sandbox.Need(t)
	conn, err := dbus.ConnectSystemBus()
	require.NoError(t, err)
	defer conn.Close()
	systemd := conn.Object("org.freedesktop.systemd1", "/org/freedesktop/systemd1")
	for _, name := range []string{"7b.service", "llama-8b.service", "a_b.service", "0-pool.target", `pool-engine-x\x2d8b.service`, "a:b@1.service"} {
		var path dbus.ObjectPath
		require.NoError(t, systemd.Call("org.freedesktop.systemd1.Manager.LoadUnit", 0, name).Store(&path), name)
		assert.Equal(t, dbus.ObjectPath("/org/freedesktop/systemd1/unit/"+PathEncode(name)), path, name)
	}
}

func FuzzPathAndArguments(f *testing.F) {
	for _, s := range []string{"llama8b", "", "a-b", "7b", "\xff\xfe", strings.Repeat("x", 4096), "../x", "a/b"} {
		f.Add(s, uint64(1000))
	}
	f.Fuzz(func(t *testing.T, id string, deadline uint64) {
		p := PoolPath(id)
		if !p.IsValid() {
			t.Fatalf("invalid object path %q for %q", p, id)
		}
		if config.ValidPoolID(id) && PathEncode(id) != sdBusLabelEscape(id) {
			t.Fatalf("%q encodes to %q, systemd to %q", id, PathEncode(id), sdBusLabelEscape(id))
		}
		if e := checkPoolID(id); e == nil && (id == "" || len(id) > 64 || !utf8.ValidString(id)) {
			t.Fatalf("pool id %q accepted", id)
		}
		if e := checkDeadline(deadline); (e == nil) != (deadline <= MaxDeadline) {
			t.Fatalf("deadline %d: %v", deadline, e)
		}
	})
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
	for _, p := range pn.Interfaces[0].Properties {
		v, ok := props[p.Name]
		require.True(t, ok, "property %s not served", p.Name)
		assert.Equal(t, p.Type, dbus.SignatureOf(v).String(), p.Name)
	}
}
