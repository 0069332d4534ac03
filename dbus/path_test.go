package dbus

import (
	"strings"
	"testing"

	sddbus "github.com/coreos/go-systemd/v22/dbus"
	godbus "github.com/godbus/dbus/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
)

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
		"\x01":     "_01",
	} {
		assert.Equal(t, want, PathEncode(in), in)
		assert.Equal(t, godbus.ObjectPath(PoolPathPrefix+"/"+want), PoolPath(in), in)
	}
	assert.True(t, PoolPath("a-b_c").IsValid())
}

// systemd itself is the reference: a unit's object path is its name put
// through sd_bus_path_encode.
func TestPathEncodeMatchesSystemdUnitPaths(t *testing.T) {
	sandbox.Need(t)
	conn, err := godbus.ConnectSystemBus()
	require.NoError(t, err)
	defer conn.Close()
	systemd := conn.Object("org.freedesktop.systemd1", "/org/freedesktop/systemd1")
	for _, name := range []string{"7b.service", "llama-8b.service", "a_b.service", "0-pool.target", `pool-engine-x\x2d8b.service`, "a:b@1.service"} {
		var path godbus.ObjectPath
		require.NoError(t, systemd.Call("org.freedesktop.systemd1.Manager.LoadUnit", 0, name).Store(&path), name)
		assert.Equal(t, godbus.ObjectPath("/org/freedesktop/systemd1/unit/"+PathEncode(name)), path, name)
		got, ok := PathDecode(string(path), "/org/freedesktop/systemd1/unit")
		assert.True(t, ok, path)
		assert.Equal(t, name, got, path)
	}
}

// Ids and unit names come back from their object paths as
// sd_bus_path_decode gives them, and a path that is not one element below
// the prefix, or has a broken escape, is refused.
func TestPathDecodeInvertsPathEncode(t *testing.T) {
	for _, id := range []string{"llama-8b", "7b", "qwen", "a_b.c", "", "ünï", "pool-engine-t1.scope", `pool-engine-first\x2dlight.scope`, "a_b:c@d"} {
		got, ok := PoolID(PoolPath(id))
		assert.True(t, ok, id)
		assert.Equal(t, id, got)
	}
	got, ok := PathDecode("/u/A_2Fb", "/u")
	assert.True(t, ok, "upper-case hex is read too")
	assert.Equal(t, "A/b", got)
	for _, p := range []godbus.ObjectPath{ManagerPath, PoolPathPrefix, PoolPathPrefix + "/", PoolPathPrefix + "/a/b", PoolPathPrefix + "/a_2", PoolPathPrefix + "/a_zz", PoolPathPrefix + "/a_", "/other/pool/x", PoolPathPrefix + "x/a"} {
		_, ok := PoolID(p)
		assert.False(t, ok, p)
	}
}

func FuzzPathCodec(f *testing.F) {
	for _, s := range []string{"llama8b", "", "a-b", "7b", "\xff\xfe", strings.Repeat("x", 4096), "../x", "a/b", "_", "a_2"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p := PoolPath(s)
		if !p.IsValid() {
			t.Fatalf("invalid object path %q for %q", p, s)
		}
		if got, ok := PoolID(p); !ok || got != s {
			t.Fatalf("%q encodes to %q, which decodes to %q (%v)", s, p, got, ok)
		}
		// go-systemd's escape agrees wherever it writes two hex digits:
		// on every byte a pool id or unit name may hold.
		if !strings.ContainsFunc(s, func(r rune) bool { return r < 0x10 }) && PathEncode(s) != sddbus.PathBusEscape(s) {
			t.Fatalf("%q encodes to %q, go-systemd to %q", s, PathEncode(s), sddbus.PathBusEscape(s))
		}
		// Whatever an element holds decodes to something or is refused,
		// and what it decodes to encodes back to a path that reads the same.
		if got, ok := PathDecode(PoolPathPrefix+"/"+s, PoolPathPrefix); ok {
			if again, _ := PoolID(PoolPath(got)); again != got {
				t.Fatalf("%q decodes to %q, which does not survive a round trip", s, got)
			}
		}
	})
}
