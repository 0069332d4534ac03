package bus_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llorch/pool-managerd/internal/bus"
	"github.com/llorch/pool-managerd/internal/journal"
)

// forgeArg makes this test binary a bus client that sends NameOwnerChanged
// signals of its own to one destination: forge-noc DEST NAME COUNT.
const forgeArg = "forge-noc"

func forge(args []string) int {
	if len(args) != 3 {
		return 2
	}
	n, err := strconv.Atoi(args[2])
	if err != nil {
		return 2
	}
	conn, err := dbus.ConnectSystemBus()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer conn.Close()
	for range n {
		msg := &dbus.Message{Type: dbus.TypeSignal, Headers: map[dbus.HeaderField]dbus.Variant{
			dbus.FieldPath:        dbus.MakeVariant(dbus.ObjectPath("/org/freedesktop/DBus")),
			dbus.FieldInterface:   dbus.MakeVariant("org.freedesktop.DBus"),
			dbus.FieldMember:      dbus.MakeVariant("NameOwnerChanged"),
			dbus.FieldDestination: dbus.MakeVariant(args[0]),
			dbus.FieldSignature:   dbus.MakeVariant(dbus.SignatureOf("", "", "")),
		}, Body: []any{args[1], args[1], ""}}
		if c := conn.Send(msg, nil); c.Err != nil {
			fmt.Fprintln(os.Stderr, c.Err)
			return 1
		}
	}
	// A round trip: the bus has taken every signal before this returns.
	if err := conn.BusObject().Call("org.freedesktop.DBus.GetId", 0).Err; err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// journalSince is the daemon's journal entries since cursor (all if ""),
// and the cursor after them.
func journalSince(t *testing.T, cursor string) ([]map[string]any, string) {
	t.Helper()
	args := []string{"-u", "pool-managerd.service", "--no-pager", "-o", "json", "--show-cursor"}
	if cursor != "" {
		args = append(args, "--after-cursor="+cursor)
	}
	out, err := exec.Command("journalctl", args...).Output()
	require.NoError(t, err)
	var entries []map[string]any
	next := cursor
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		if c, ok := strings.CutPrefix(sc.Text(), "-- cursor: "); ok {
			next = c
			continue
		}
		var e map[string]any
		require.NoError(t, json.Unmarshal(sc.Bytes(), &e), sc.Text())
		entries = append(entries, e)
	}
	return entries, next
}

// A flood of forged NameOwnerChanged from another user reaches the
// journal as a few lines (a burst per window, then the number left out),
// every one is counted in the textfile, and journald still takes the
// crash that follows: the flood did not spend the unit's rate limit.
func TestAFloodOfForgedSignalsIsCountedNotJournaled(t *testing.T) {
	dir, _ := daemon(t)
	waitProp(t, "llama-8b", "Ready", "b true")
	sh(t, "useradd", "--system", "--no-create-home", "mallory")
	t.Cleanup(func() { exec.Command("userdel", "mallory").Run() })
	conn, err := dbus.ConnectSystemBus()
	require.NoError(t, err)
	defer conn.Close()
	var daemonName string
	require.NoError(t, conn.BusObject().Call("org.freedesktop.DBus.GetNameOwner", 0, bus.Name).Store(&daemonName))

	// This binary, where mallory may run it.
	exe, err := os.Executable()
	require.NoError(t, err)
	bin, err := os.MkdirTemp("", "forge-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(bin) })
	require.NoError(t, os.Chmod(bin, 0o755))
	copyFile(t, exe, filepath.Join(bin, "forge"))

	_, cursor := journalSince(t, "")
	const sent = 10000
	began := time.Now()
	sh(t, "setpriv", "--reuid=mallory", "--regid=mallory", "--clear-groups", filepath.Join(bin, "forge"), forgeArg,
		daemonName, conn.Names()[0], strconv.Itoa(sent))
	textfile := filepath.Join(dir, "metrics", "pool-managerd.prom")
	const series = `pool_managerd_bus_rejected_total{reason="forged_signal"}`
	require.Eventually(t, func() bool { v, _ := textfileValue(t, textfile, series); return v == sent },
		60*time.Second, 100*time.Millisecond, "every forged signal is counted")
	v, _ := textfileValue(t, textfile, series)
	assert.Equal(t, float64(sent), v)

	pid := strings.TrimPrefix(getProp(t, "llama-8b", "MainPID"), "u ")
	sh(t, "kill", "-SEGV", pid)
	waitProp(t, "llama-8b", "CrashCount", "u 1")

	// Every forgery is in the journal, as a line or in a SUPPRESSED
	// count, once the last window has ended.
	var ignored, suppressedLines, suppressed int
	crashed := false
	require.Eventually(t, func() bool {
		entries, _ := journalSince(t, cursor)
		ignored, suppressedLines, suppressed, crashed = 0, 0, 0, false
		for _, e := range entries {
			switch msg, _ := e["MESSAGE"].(string); {
			case msg == "ignored a NameOwnerChanged that the bus did not send":
				ignored++
			case strings.HasPrefix(msg, "warnings caused by others suppressed") && e["WARNING_KIND"] == "forged_signal":
				suppressedLines++
				n, err := strconv.Atoi(fmt.Sprint(e["SUPPRESSED"]))
				require.NoError(t, err)
				suppressed += n
			}
			if e["MESSAGE_ID"] == string(journal.MsgCrash) {
				crashed = true
			}
		}
		return ignored+suppressed == sent && crashed
	}, 2*journal.LimitWindow+30*time.Second, 200*time.Millisecond, "all forgeries accounted for and the crash journaled")
	windows := int(time.Since(began)/journal.LimitWindow) + 1
	assert.LessOrEqual(t, ignored, journal.LimitBurst*windows, "a burst per window")
	assert.LessOrEqual(t, suppressedLines, windows, "one line per window says how many were left out")
	assert.True(t, crashed, "the crash after the flood is in the journal")
	t.Logf("%d forgeries: %d lines, %d suppressed in %d lines, over %s", sent, ignored, suppressed, suppressedLines, time.Since(began))
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	in, err := os.Open(from)
	require.NoError(t, err)
	defer in.Close()
	out, err := os.OpenFile(to, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o755)
	require.NoError(t, err)
	_, err = io.Copy(out, in)
	require.NoError(t, err)
	require.NoError(t, out.Close())
}
