package bus

import (
	"encoding/binary"
	"io"
	"reflect"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/godbus/dbus/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	shipped "github.com/llorch/pool-managerd/dbus"
	"github.com/llorch/pool-managerd/internal/safetext"
	"github.com/llorch/pool-managerd/internal/supervisor"
)

// Whatever text a snapshot carries, every string property is one the bus
// accepts, and bounded: one bad string would fail the whole
// PropertiesChanged and leave GetAll unanswered.
func TestEveryStringPropertyIsSafe(t *testing.T) {
	bad := "\xff\x00\x1b[2J" + strings.Repeat("é", 2000)
	var snap supervisor.Snapshot
	setStrings(reflect.ValueOf(&snap).Elem(), bad)
	require.Equal(t, bad, snap.LastError, "the View's strings too")
	props := properties(snap)
	strs := 0
	for name, p := range props {
		s, ok := p.(string)
		if !ok {
			continue
		}
		strs++
		assert.True(t, utf8.ValidString(s), name)
		assert.LessOrEqual(t, len(s), safetext.Max, name)
		assert.False(t, strings.ContainsRune(s, 0), name)
	}
	require.NotZero(t, strs)
	// The PropertiesChanged of all of them encodes.
	changed := map[string]dbus.Variant{}
	for k, p := range props {
		changed[k] = dbus.MakeVariant(p)
	}
	body := []any{PoolIface, changed, []string{}}
	msg := &dbus.Message{Type: dbus.TypeSignal, Body: body, Headers: map[dbus.HeaderField]dbus.Variant{
		dbus.FieldPath:      dbus.MakeVariant(shipped.PoolPath("p")),
		dbus.FieldInterface: dbus.MakeVariant("org.freedesktop.DBus.Properties"),
		dbus.FieldMember:    dbus.MakeVariant("PropertiesChanged"),
		dbus.FieldSignature: dbus.MakeVariant(dbus.SignatureOf(body...)),
	}}
	assert.NoError(t, msg.EncodeTo(io.Discard, binary.LittleEndian))
}

// setStrings sets every string field of v, and of the structs it holds,
// to s.
func setStrings(v reflect.Value, s string) {
	for i := range v.NumField() {
		switch f := v.Field(i); {
		case !f.CanSet():
		case f.Kind() == reflect.String:
			f.SetString(s)
		case f.Kind() == reflect.Struct:
			setStrings(f, s)
		}
	}
}
