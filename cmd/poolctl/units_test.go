package main

import (
	"flag"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	ifaces "github.com/llorch/pool-managerd/dbus"
)

func TestSpansAreWrittenAsSystemdWritesThem(t *testing.T) {
	for d, want := range map[time.Duration]string{
		0: "0s", 300 * time.Millisecond: "300ms", 5 * time.Second: "5s", 65 * time.Second: "1min 5s",
		time.Hour + 5*time.Second: "1h 5s", 26*time.Hour + 3*time.Minute + 4*time.Second: "1d 2h",
	} {
		assert.Equal(t, want, span(d), d.String())
	}
}

// Flags may come before, between or after the arguments; after "--" all
// are arguments.
func TestFlagsMayFollowTheArguments(t *testing.T) {
	for _, c := range []struct {
		args []string
		pos  []string
		dl   time.Duration
	}{
		{[]string{"llama", "--deadline", "5s"}, []string{"llama"}, 5 * time.Second},
		{[]string{"--deadline=2s", "llama", "m.gguf"}, []string{"llama", "m.gguf"}, 2 * time.Second},
		{[]string{"llama", "--deadline", "1s", "m.gguf"}, []string{"llama", "m.gguf"}, time.Second},
		{[]string{"--", "-odd", "--deadline"}, []string{"-odd", "--deadline"}, 30 * time.Second},
	} {
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		dl := fs.Duration("deadline", 30*time.Second, "")
		pos, err := parseInterspersed(fs, c.args)
		require.NoError(t, err, c.args)
		assert.Equal(t, c.pos, pos, c.args)
		assert.Equal(t, c.dl, *dl, c.args)
	}
}

// The live line says the step and, while it is known, the share done.
func TestProgressLineSaysStepAndShare(t *testing.T) {
	p := progressLine{verb: "reload", pool: "llama", progress: -1}
	assert.Equal(t, "reload llama: waiting (0s)", p.String(0))
	assert.True(t, p.apply(map[string]dbus.Variant{"Operation": dbus.MakeVariant("staging"), "Progress": dbus.MakeVariant(0.427)}))
	assert.Equal(t, "reload llama: staging 42% (3s)", p.String(3500*time.Millisecond))
	assert.False(t, p.apply(map[string]dbus.Variant{"Progress": dbus.MakeVariant(-1.0)}))
	assert.Equal(t, "reload llama: staging (3s)", p.String(3*time.Second))
	assert.True(t, p.apply(map[string]dbus.Variant{"Operation": dbus.MakeVariant("starting")}))
	assert.Equal(t, "reload llama: starting (1min 2s)", p.String(62*time.Second))
	assert.Equal(t, "reload l", fit("reload llama: starting", 9))
}

// Errors read as the D-Bus error name, then the daemon's message.
func TestErrorsReadAsTheirDBusName(t *testing.T) {
	assert.Equal(t, "org.llorch.PoolManager1.Error.NoSuchPool: no pool \"x\"",
		describe(dbus.Error{Name: ifaces.ErrNoSuchPool, Body: []any{`no pool "x"`}}))
	assert.Equal(t, "org.llorch.PoolManager1.Error.Busy", describe(&dbus.Error{Name: ifaces.ErrBusy}))
	assert.Contains(t, describe(dbus.Error{Name: accessDenied, Body: []any{"Stop is for root and the admin group; uid 1000 is neither"}}),
		"org.freedesktop.DBus.Error.AccessDenied: Stop is for root and the admin group; uid 1000 is neither; changing pools is for root")
	assert.Regexp(t, `^org\.freedesktop\.DBus\.Error\.AccessDenied: the bus refused uid [0-9]+: changing pools is for root and the pool-managerd admin group \(pool-admin unless AdminGroup= says otherwise\)$`,
		describe(dbus.Error{Name: accessDenied, Body: []any{`Rejected send message, 1 matched rules; type="method_call", sender=":1.38"`}}))
}
