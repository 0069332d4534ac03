package witness

import (
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	api "github.com/llorch/pool-managerd/dbus"
)

// step is one signal, or one thing the daemon does, in a unit's history.
type step struct {
	o      *observation
	expect string // ExpectStop, named
	bind   string // Stop.Job of the named mark, with job
	cancel string
	job    uint32
}

func props(active, sub string, job uint32) step {
	return step{o: &observation{kind: obsUnit, active: active, sub: sub, hasJob: true, job: job, invocation: "a1"}}
}

func propsOf(inv, active, sub string, job uint32) step {
	return step{o: &observation{kind: obsUnit, active: active, sub: sub, hasJob: true, job: job, invocation: inv}}
}

func result(r string) step { return step{o: &observation{kind: obsScope, result: r}} }
func jobRemoved(id uint32) step {
	return step{o: &observation{kind: obsJobRemoved, job: id, jobResult: "done"}}
}

var unitRemoved = step{o: &observation{kind: obsUnitRemoved}}

// creation is what systemd 252 sends when a scope is made (job 177).
var creation = []step{
	result("success"), props("inactive", "dead", 177),
	result("success"), props("active", "running", 177),
	jobRemoved(177),
	result("success"), props("active", "running", 0),
}

// stopSeq is a systemctl stop (job 183) as systemd 252 sends it.
var stopSeq = []step{
	result("success"), props("active", "running", 183),
	result("success"), props("deactivating", "stop-sigterm", 183),
	result("success"), props("inactive", "dead", 183),
	jobRemoved(183),
	result("success"), props("inactive", "dead", 0),
	unitRemoved,
}

func seq(parts ...[]step) []step {
	var s []step
	for _, p := range parts {
		s = append(s, p...)
	}
	return s
}

type want struct {
	kind   Kind
	cause  Cause
	active string
	sub    string
	result string
}

func TestClassifySystemdHistories(t *testing.T) {
	started := want{Started, NoCause, "active", "running", "success"}
	removed := want{Removed, NoCause, "inactive", "dead", "success"}
	for _, c := range []struct {
		name  string
		steps []step
		want  []want
	}{
		{"systemctl kill of the whole scope: dead with no job, Result=success",
			seq(creation, []step{result("success"), props("inactive", "dead", 0), unitRemoved}),
			[]want{started, {Dead, Emptied, "inactive", "dead", "success"}, removed}},
		{"a MemoryMax OOM under the cgroup v1 memory controller reads as a kill",
			seq(creation, []step{result("success"), props("inactive", "dead", 0), unitRemoved}),
			[]want{started, {Dead, Emptied, "inactive", "dead", "success"}, removed}},
		{"an operator's systemctl stop",
			seq(creation, stopSeq),
			[]want{started, {Stopping, OperatorStop, "deactivating", "stop-sigterm", "success"}, {Dead, OperatorStop, "inactive", "dead", "success"}, removed}},
		{"a stop announced before StopUnit is ours",
			seq(creation, []step{{expect: "s"}}, stopSeq),
			[]want{started, {Stopping, OurStop, "deactivating", "stop-sigterm", "success"}, {Dead, OurStop, "inactive", "dead", "success"}, removed}},
		{"a stop announced and bound to its job is ours",
			seq(creation, []step{{expect: "s"}, {bind: "s", job: 183}}, stopSeq),
			[]want{started, {Stopping, OurStop, "deactivating", "stop-sigterm", "success"}, {Dead, OurStop, "inactive", "dead", "success"}, removed}},
		{"our stop bound to another job leaves this one the operator's",
			seq(creation, []step{{expect: "s"}, {bind: "s", job: 99}}, stopSeq, []step{jobRemoved(99)}),
			[]want{started, {Stopping, OperatorStop, "deactivating", "stop-sigterm", "success"}, {Dead, OperatorStop, "inactive", "dead", "success"}, removed}},
		{"a cancelled announcement claims nothing",
			seq(creation, []step{{expect: "s"}, {cancel: "s"}}, stopSeq),
			[]want{started, {Stopping, OperatorStop, "deactivating", "stop-sigterm", "success"}, {Dead, OperatorStop, "inactive", "dead", "success"}, removed}},
		{"our announcement is used up by our stop: the next scope's stop is the operator's",
			seq(creation, []step{{expect: "s"}}, stopSeq, creation, stopSeq),
			[]want{started, {Stopping, OurStop, "deactivating", "stop-sigterm", "success"}, {Dead, OurStop, "inactive", "dead", "success"}, removed,
				started, {Stopping, OperatorStop, "deactivating", "stop-sigterm", "success"}, {Dead, OperatorStop, "inactive", "dead", "success"}, removed}},
		{"our stop of a scope already dead ends at once and takes its announcement (job told after it ended)",
			seq(creation, []step{result("success"), props("inactive", "dead", 0), {expect: "s"},
				props("inactive", "dead", 40), jobRemoved(40), props("inactive", "dead", 0), {bind: "s", job: 40}, unitRemoved},
				creation, stopSeq),
			[]want{started, {Dead, Emptied, "inactive", "dead", "success"}, removed,
				started, {Stopping, OperatorStop, "deactivating", "stop-sigterm", "success"}, {Dead, OperatorStop, "inactive", "dead", "success"}, removed}},
		{"our stop of a scope already dead ends at once and takes its announcement (job told before it ended)",
			seq(creation, []step{result("success"), props("inactive", "dead", 0), {expect: "s"}, {bind: "s", job: 40},
				props("inactive", "dead", 40), jobRemoved(40), props("inactive", "dead", 0), unitRemoved},
				creation, stopSeq),
			[]want{started, {Dead, Emptied, "inactive", "dead", "success"}, removed,
				started, {Stopping, OperatorStop, "deactivating", "stop-sigterm", "success"}, {Dead, OperatorStop, "inactive", "dead", "success"}, removed}},
		{"a stop whose SIGTERM is ignored ends failed with Result=timeout, still a stop",
			seq(creation, []step{
				result("success"), props("active", "running", 190),
				result("success"), props("deactivating", "stop-sigterm", 190),
				result("timeout"), props("deactivating", "stop-sigkill", 190),
				result("timeout"), props("failed", "failed", 190),
				jobRemoved(190),
				result("timeout"), props("failed", "failed", 0), unitRemoved}),
			[]want{started, {Stopping, OperatorStop, "deactivating", "stop-sigterm", "success"}, {Dead, OperatorStop, "failed", "failed", "timeout"},
				{Removed, NoCause, "failed", "failed", "timeout"}}},
		{"a cgroup v2 OOM kill (OOMPolicy=stop): deactivating with no job, then failed with Result=oom-kill",
			seq(creation, []step{
				result("oom-kill"), props("deactivating", "stop-sigterm", 0),
				result("oom-kill"), props("failed", "failed", 0), unitRemoved}),
			[]want{started, {Dead, OOMKilled, "failed", "failed", "oom-kill"}, {Removed, NoCause, "failed", "failed", "oom-kill"}}},
		{"RuntimeMaxSec ran out",
			seq(creation, []step{
				result("timeout"), props("deactivating", "stop-sigterm", 0),
				result("timeout"), props("failed", "failed", 0)}),
			[]want{started, {Dead, TimedOut, "failed", "failed", "timeout"}}},
		{"a scope unloaded while running vanished",
			seq(creation, []step{unitRemoved}),
			[]want{started, {Removed, Vanished, "active", "running", "success"}}},
		{"a unit only loaded and unloaded (systemctl show of a missing scope) says nothing",
			[]step{unitRemoved, unitRemoved},
			nil},
		{"a systemctl start of the running scope is no stop",
			seq(creation, []step{
				result("success"), props("active", "running", 200), jobRemoved(200), result("success"), props("active", "running", 0),
				result("success"), props("inactive", "dead", 0)}),
			[]want{started, {Dead, Emptied, "inactive", "dead", "success"}}},
		{"a scope that ran before the witness, first seen dead",
			[]step{result("success"), props("inactive", "dead", 0), unitRemoved},
			[]want{{Dead, Emptied, "inactive", "dead", "success"}, removed}},
		{"a scope that ran before the witness, first seen stopped by the operator",
			stopSeq,
			[]want{started, {Stopping, OperatorStop, "deactivating", "stop-sigterm", "success"}, {Dead, OperatorStop, "inactive", "dead", "success"}, removed}},
		{"a start that fails is no death",
			[]step{result("success"), props("inactive", "dead", 177), result("resources"), props("failed", "failed", 177), jobRemoved(177)},
			nil},
		{"a new invocation under the same name with the removal missed is a new life",
			[]step{
				result("success"), propsOf("a1", "active", "running", 0), result("success"), propsOf("a1", "inactive", "dead", 0),
				result("success"), propsOf("b2", "inactive", "dead", 300), propsOf("b2", "active", "running", 300), jobRemoved(300),
				result("success"), propsOf("b2", "inactive", "dead", 0)},
			[]want{started, {Dead, Emptied, "inactive", "dead", "success"}, started, {Dead, Emptied, "inactive", "dead", "success"}}},
		{"the repeated dead state after a death is not a second death",
			seq(creation, []step{result("success"), props("inactive", "dead", 0), result("success"), props("inactive", "dead", 0)}),
			[]want{started, {Dead, Emptied, "inactive", "dead", "success"}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			tr := &tracker{unit: "pool-engine-t1.scope"}
			marks := map[string]*mark{}
			at := time.Unix(1000, 0)
			var got []want
			for _, s := range c.steps {
				switch {
				case s.o != nil:
					for _, e := range tr.observe(*s.o, at) {
						assert.Equal(t, "pool-engine-t1.scope", e.Unit)
						assert.Equal(t, at, e.At)
						if e.Cause == OurStop || e.Cause == OperatorStop {
							assert.NotZero(t, e.Job, "a stop names its job")
						}
						got = append(got, want{e.Kind, e.Cause, e.ActiveState, e.SubState, e.Result})
					}
				case s.expect != "":
					marks[s.expect] = tr.expect()
				case s.bind != "":
					tr.bind(marks[s.bind], s.job)
				case s.cancel != "":
					tr.forget(marks[s.cancel])
				}
				at = at.Add(time.Millisecond)
			}
			assert.Equal(t, c.want, got)
			assert.Empty(t, tr.marks, "every announcement is used up or withdrawn")
		})
	}
}

// Our scopes' object paths are told apart by their escaped prefix.
func TestOurScopesPathsAreEscapedLikeSystemds(t *testing.T) {
	assert.Equal(t, "/org/freedesktop/systemd1/unit/pool_2dengine_2dx_2escope", unitPathPrefix+api.PathEncode("pool-engine-x.scope"))
	assert.Equal(t, "/org/freedesktop/systemd1/unit/pool_2dengine_2d", ourPaths)
	for _, u := range []string{"pool-engine-t1.scope", `pool-engine-first\x2dlight.scope`} {
		got, ok := api.PathDecode(unitPathPrefix+api.PathEncode(u), string(unitNamespace))
		require.True(t, ok, u)
		assert.Equal(t, u, got)
	}
}

func TestOnlySystemdsSignalsAboutOurScopesAreRead(t *testing.T) {
	const systemd = ":1.0"
	path := dbus.ObjectPath(unitPathPrefix + api.PathEncode("pool-engine-t1.scope"))
	unitProps := []any{unitIface, map[string]dbus.Variant{
		"ActiveState":          dbus.MakeVariant("inactive"),
		"SubState":             dbus.MakeVariant("dead"),
		"Job":                  dbus.MakeVariant([]any{uint32(7), dbus.ObjectPath("/org/freedesktop/systemd1/job/7")}),
		"InvocationID":         dbus.MakeVariant([]byte{0xab, 0xcd}),
		"StateChangeTimestamp": dbus.MakeVariant(uint64(1_700_000_000_000_001)),
	}, []string{}}
	for _, c := range []struct {
		name string
		sig  dbus.Signal
		unit string
		want observation
	}{
		{name: "the unit's state from systemd",
			sig:  dbus.Signal{Sender: systemd, Path: path, Name: propsChanged, Body: unitProps},
			unit: "pool-engine-t1.scope",
			want: observation{kind: obsUnit, active: "inactive", sub: "dead", hasJob: true, job: 7, invocation: "abcd", changed: time.UnixMicro(1_700_000_000_000_001)}},
		{name: "the scope's result from systemd",
			sig:  dbus.Signal{Sender: systemd, Path: path, Name: propsChanged, Body: []any{scopeIface, map[string]dbus.Variant{"Result": dbus.MakeVariant("oom-kill")}, []string{}}},
			unit: "pool-engine-t1.scope", want: observation{kind: obsScope, result: "oom-kill"}},
		{name: "JobRemoved from systemd",
			sig:  dbus.Signal{Sender: systemd, Path: systemdPath, Name: manager + ".JobRemoved", Body: []any{uint32(7), dbus.ObjectPath("/org/freedesktop/systemd1/job/7"), "pool-engine-t1.scope", "done"}},
			unit: "pool-engine-t1.scope", want: observation{kind: obsJobRemoved, job: 7, jobResult: "done"}},
		{name: "UnitRemoved from systemd",
			sig:  dbus.Signal{Sender: systemd, Path: systemdPath, Name: manager + ".UnitRemoved", Body: []any{"pool-engine-t1.scope", path}},
			unit: "pool-engine-t1.scope", want: observation{kind: obsUnitRemoved}},
		{name: "a forged PropertiesChanged from another client",
			sig: dbus.Signal{Sender: ":1.42", Path: path, Name: propsChanged, Body: unitProps}},
		{name: "a forged JobRemoved from another client",
			sig: dbus.Signal{Sender: ":1.42", Path: systemdPath, Name: manager + ".JobRemoved", Body: []any{uint32(7), dbus.ObjectPath("/j"), "pool-engine-t1.scope", "done"}}},
		{name: "a forged UnitRemoved that names systemd's well-known name as sender",
			sig: dbus.Signal{Sender: systemdName, Path: systemdPath, Name: manager + ".UnitRemoved", Body: []any{"pool-engine-t1.scope", path}}},
		{name: "another unit's state",
			sig: dbus.Signal{Sender: systemd, Path: dbus.ObjectPath(unitPathPrefix + "other_2eservice"), Name: propsChanged, Body: unitProps}},
		{name: "a unit of our prefix that is no scope",
			sig: dbus.Signal{Sender: systemd, Path: dbus.ObjectPath(unitPathPrefix + api.PathEncode("pool-engine-t1.service")), Name: propsChanged, Body: unitProps}},
		{name: "another unit's JobRemoved",
			sig: dbus.Signal{Sender: systemd, Path: systemdPath, Name: manager + ".JobRemoved", Body: []any{uint32(7), dbus.ObjectPath("/j"), "other.scope", "done"}}},
		{name: "a JobRemoved on another path",
			sig: dbus.Signal{Sender: systemd, Path: path, Name: manager + ".JobRemoved", Body: []any{uint32(7), dbus.ObjectPath("/j"), "pool-engine-t1.scope", "done"}}},
		{name: "a body of the wrong types",
			sig: dbus.Signal{Sender: systemd, Path: path, Name: propsChanged, Body: []any{uint32(1), "x"}}},
		{name: "an empty JobRemoved",
			sig: dbus.Signal{Sender: systemd, Path: systemdPath, Name: manager + ".JobRemoved"}},
		{name: "before systemd's name is known",
			sig: dbus.Signal{Sender: "", Path: path, Name: propsChanged, Body: unitProps}},
	} {
		t.Run(c.name, func(t *testing.T) {
			unit, o, ok := parse(&c.sig, systemd)
			if c.unit == "" {
				assert.False(t, ok)
				return
			}
			require.True(t, ok)
			assert.Equal(t, c.unit, unit)
			assert.Equal(t, c.want, o)
		})
	}
	// Weird property types are ignored, not a crash.
	_, o, ok := parse(&dbus.Signal{Sender: systemd, Path: path, Name: propsChanged, Body: []any{unitIface, map[string]dbus.Variant{
		"ActiveState": dbus.MakeVariant(uint32(3)), "Job": dbus.MakeVariant("x"), "InvocationID": dbus.MakeVariant("y")}, []string{}}}, systemd)
	require.True(t, ok)
	assert.Equal(t, observation{kind: obsUnit}, o)
}

func TestOnlyTheBusDriverNamesSystemdsOwner(t *testing.T) {
	owner, ok := nameOwnerChanged(&dbus.Signal{Sender: busDriver, Name: busDriver + ".NameOwnerChanged", Body: []any{systemdName, ":1.0", ":1.9"}})
	assert.True(t, ok)
	assert.Equal(t, ":1.9", owner)
	_, ok = nameOwnerChanged(&dbus.Signal{Sender: ":1.42", Name: busDriver + ".NameOwnerChanged", Body: []any{systemdName, ":1.0", ":1.42"}})
	assert.False(t, ok, "a forged NameOwnerChanged")
	_, ok = nameOwnerChanged(&dbus.Signal{Sender: busDriver, Name: busDriver + ".NameOwnerChanged", Body: []any{"org.example", "", ":1.42"}})
	assert.False(t, ok, "another name")
}

func TestOnlySystemdsReloadingIsRead(t *testing.T) {
	const systemd = ":1.0"
	reloading := func(sender string, path dbus.ObjectPath, body ...any) *dbus.Signal {
		return &dbus.Signal{Sender: sender, Path: path, Name: manager + ".Reloading", Body: body}
	}
	on, ok := reloadingSignal(reloading(systemd, systemdPath, true), systemd)
	assert.True(t, ok && on, "a reload begins")
	on, ok = reloadingSignal(reloading(systemd, systemdPath, false), systemd)
	assert.True(t, ok && !on, "a reload ends")
	for name, sig := range map[string]*dbus.Signal{
		"from another client":         reloading(":1.42", systemdPath, true),
		"before systemd's name known": reloading(systemd, systemdPath, true),
		"on another path":             reloading(systemd, "/org/example", true),
		"with no body":                reloading(systemd, systemdPath),
		"with a string body":          reloading(systemd, systemdPath, "true"),
		"with two values":             reloading(systemd, systemdPath, true, true),
	} {
		known := systemd
		if name == "before systemd's name known" {
			known = ""
		}
		_, ok := reloadingSignal(sig, known)
		assert.False(t, ok, name)
	}
	_, ok = reloadingSignal(&dbus.Signal{Sender: systemd, Path: systemdPath, Name: manager + ".UnitRemoved", Body: []any{true}}, systemd)
	assert.False(t, ok, "another member")
}

func TestOursIsThePoolEngineScopes(t *testing.T) {
	assert.True(t, Ours("pool-engine-t1.scope"))
	assert.True(t, Ours(`pool-engine-first\x2dlight.scope`))
	assert.False(t, Ours("pool-engine-.scope"))
	assert.False(t, Ours("pool-engine-t1.service"))
	assert.False(t, Ours("other-t4.scope"))
}
