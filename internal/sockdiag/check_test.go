package sockdiag

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func listener(addr string, v6only bool) Owner {
	return Owner{Addr: netip.MustParseAddrPort(addr), V6Only: v6only}
}

// A listener counts when the kernel could hand it a connection to the
// probed address: the exact address, its family's wildcard, and for IPv4
// a dual-stack :: or a v4-mapped bind of the same address.
func TestReceivesFollowsTheKernelsLookup(t *testing.T) {
	for _, c := range []struct {
		probe    string
		listener Owner
		want     bool
	}{
		{"127.0.0.1", listener("127.0.0.1:8081", false), true},
		{"127.0.0.1", listener("127.0.0.1:8082", false), false},
		{"127.0.0.1", listener("127.0.0.2:8081", false), false},
		{"127.0.0.1", listener("0.0.0.0:8081", false), true},
		{"127.0.0.1", listener("[::]:8081", false), true},
		{"127.0.0.1", listener("[::]:8081", true), false},
		{"127.0.0.1", listener("[::ffff:127.0.0.1]:8081", false), true},
		{"127.0.0.1", listener("[::ffff:127.0.0.2]:8081", false), false},
		{"127.0.0.1", listener("[::1]:8081", false), false},
		{"::ffff:127.0.0.1", listener("127.0.0.1:8081", false), true},
		{"::1", listener("[::1]:8081", true), true},
		{"::1", listener("[::]:8081", true), true},
		{"::1", listener("[::]:8081", false), true},
		{"::1", listener("0.0.0.0:8081", false), false},
		{"::1", listener("127.0.0.1:8081", false), false},
		{"::1", listener("[::ffff:127.0.0.1]:8081", false), false},
		{"fe80::1%eth0", listener("[fe80::1]:8081", false), true},
		{"0.0.0.0", listener("[::1]:8081", false), true},
		{"::", listener("10.0.0.1:8081", false), true},
	} {
		assert.Equal(t, c.want, receives(c.listener, netip.MustParseAddr(c.probe), 8081), "probe %s, listener %+v", c.probe, c.listener)
	}
}

// The decision: by cgroup where the kernel gives socket cgroups, by uid
// (and saying why) where it cannot, refusing the first foreign listener
// that could take the probe, and refusing when nothing listens.
func TestCheckRefusesAnyForeignListener(t *testing.T) {
	const engine, squatter = 999, 1001
	scope := Scope{Unit: "pool-engine-x.scope", CgroupID: 7, UID: engine}
	mine := func(addr string) Owner {
		return Owner{Addr: netip.MustParseAddrPort(addr), UID: engine, Inode: 100, CgroupID: 7}
	}
	foreign := func(addr string, uid uint32, cg uint64) Owner {
		return Owner{Addr: netip.MustParseAddrPort(addr), UID: uid, Inode: 4711, CgroupID: cg}
	}
	modern := facts{rootCgroup: 1}
	legacy := facts{rootCgroup: 1, sharedSkData: true}
	for _, c := range []struct {
		name    string
		owners  []Owner
		probe   string
		scope   Scope
		facts   facts
		method  Method
		foreign *Owner
		message string
	}{
		{name: "the scope's listener", owners: []Owner{mine("127.0.0.1:8081")}, probe: "127.0.0.1", method: ByCgroup},
		{name: "the scope's dual-stack listener", owners: []Owner{mine("[::]:8081")}, probe: "127.0.0.1", method: ByCgroup},
		{name: "a squatter's listener elsewhere does not matter", owners: []Owner{mine("127.0.0.1:8081"), foreign("127.0.0.2:8081", squatter, 9), foreign("[::1]:8081", squatter, 9), foreign("127.0.0.1:8082", squatter, 9)},
			probe: "127.0.0.1", method: ByCgroup},
		{name: "another user's squatter", owners: []Owner{foreign("127.0.0.1:8081", squatter, 9)}, probe: "127.0.0.1", method: ByCgroup,
			message: "port 8081 on 127.0.0.1 is held by a socket of uid 1001 outside pool-engine-x.scope (inode 4711, listening on 127.0.0.1:8081, cgroup id 9, the scope's is 7)"},
		{name: "the engine's user outside the scope", owners: []Owner{foreign("0.0.0.0:8081", engine, 9)}, probe: "127.0.0.1", method: ByCgroup,
			message: "port 8081 on 127.0.0.1 is held by a socket of uid 999 outside pool-engine-x.scope (inode 4711, listening on 0.0.0.0:8081, cgroup id 9, the scope's is 7)"},
		{name: "a squatter in the root cgroup", owners: []Owner{foreign("[::]:8081", squatter, 1)}, probe: "::1", method: ByCgroup,
			message: "port 8081 on ::1 is held by a socket of uid 1001 outside pool-engine-x.scope (inode 4711, listening on [::]:8081, cgroup id 1, the scope's is 7)"},
		{name: "a squatter beside the scope's listener", owners: []Owner{mine("0.0.0.0:8081"), foreign("[::]:8081", squatter, 9)}, probe: "::1", method: ByCgroup,
			message: "port 8081 on ::1 is held by a socket of uid 1001 outside pool-engine-x.scope"},
		{name: "no socket cgroups: the engine's uid passes", owners: []Owner{foreign("127.0.0.1:8081", engine, 0)}, probe: "127.0.0.1", method: ByUID},
		{name: "no socket cgroups: another uid is refused", owners: []Owner{foreign("127.0.0.1:8081", squatter, 0)}, probe: "127.0.0.1", method: ByUID,
			message: "port 8081 on 127.0.0.1 is held by a socket of uid 1001 outside pool-engine-x.scope (inode 4711, listening on 127.0.0.1:8081; checked by uid, the engine's is 999, because the kernel reports no socket cgroups (Linux < 5.7))"},
		{name: "no cgroup v2 on the host", owners: []Owner{foreign("127.0.0.1:8081", squatter, 0)}, probe: "127.0.0.1", scope: Scope{Unit: "pool-engine-x.scope", UID: engine}, method: ByUID,
			message: "because the host has no cgroup v2 id for the scope"},
		{name: "before 5.15 a root-cgroup socket may be net_cls's doing", owners: []Owner{foreign("127.0.0.1:8081", engine, 1)}, probe: "127.0.0.1", facts: legacy, method: ByUID},
		{name: "before 5.15 the uid still refuses a squatter", owners: []Owner{foreign("127.0.0.1:8081", squatter, 1)}, probe: "127.0.0.1", facts: legacy, method: ByUID,
			message: "because before Linux 5.15 a configured net_cls or net_prio"},
		{name: "before 5.15 another cgroup is still foreign", owners: []Owner{foreign("127.0.0.1:8081", engine, 9)}, probe: "127.0.0.1", facts: legacy, method: ByCgroup,
			message: "cgroup id 9, the scope's is 7"},
		{name: "nothing listens", owners: []Owner{foreign("127.0.0.2:8081", squatter, 9)}, probe: "127.0.0.1"},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := scope
			if c.scope.Unit != "" {
				s = c.scope
			}
			f := modern
			if c.facts.rootCgroup != 0 {
				f = c.facts
			}
			m, err := check(c.owners, netip.MustParseAddr(c.probe), 8081, s, f)
			switch {
			case c.method == 0:
				assert.ErrorIs(t, err, ErrNoListener)
				assert.EqualError(t, err, "port 8081 on 127.0.0.1: no listener")
			case c.message == "":
				assert.NoError(t, err)
			default:
				var fe *ForeignError
				require.True(t, errors.As(err, &fe), "a *ForeignError: %v", err)
				assert.Contains(t, err.Error(), c.message)
				assert.NotEqual(t, uint32(100), fe.Owner.Inode, "the foreign listener is named")
			}
			assert.Equal(t, c.method, m)
		})
	}
}

// A listener made in a cgroup beneath the scope's (a container's, split
// off by podman run --cgroups=split) passes where the scope's path is
// known; a sibling whose name merely starts with the scope's, the scope's
// parent, a cgroup gone since, or any cgroup when the path is unknown,
// does not.
func TestListenerBeneathTheScopePasses(t *testing.T) {
	const engine = 999
	const scopePath = "/pool.slice/pool-managerd.slice/pool-managerd-engines.slice/pool-engine-x.scope"
	paths := map[uint64]string{
		7:  scopePath,
		8:  scopePath + "/libpod-payload-0123",
		9:  scopePath + "/runtime/deeper",
		10: scopePath + "-evil/libpod-payload-0123",
		11: scopePath + "2",
		12: "/pool.slice/pool-managerd.slice/pool-managerd-engines.slice",
		13: "/",
	}
	f := facts{rootCgroup: 13, pathOf: func(id uint64) (string, error) {
		if p, ok := paths[id]; ok {
			return p, nil
		}
		return "", errors.New("stale file handle")
	}}
	at := func(cg uint64) []Owner {
		return []Owner{{Addr: netip.MustParseAddrPort("127.0.0.1:8081"), UID: engine, Inode: 4711, CgroupID: cg}}
	}
	probe := netip.MustParseAddr("127.0.0.1")
	withPath := Scope{Unit: "pool-engine-x.scope", CgroupID: 7, UID: engine, Path: scopePath}
	for cg, ok := range map[uint64]bool{7: true, 8: true, 9: true, 10: false, 11: false, 12: false, 13: false, 99: false} {
		m, err := check(at(cg), probe, 8081, withPath, f)
		assert.Equal(t, ByCgroup, m)
		if ok {
			assert.NoError(t, err, "cgroup %d (%s)", cg, paths[cg])
			continue
		}
		var fe *ForeignError
		assert.True(t, errors.As(err, &fe), "cgroup %d (%s) refused: %v", cg, paths[cg], err)
	}
	// Unknown (or unusable) path: the scope's own cgroup only.
	for _, p := range []string{"", "/", scopePath + "/", scopePath + "/../pool-engine-y.scope"} {
		s := withPath
		s.Path = p
		_, err := check(at(8), probe, 8081, s, f)
		assert.Error(t, err, "path %q", p)
		_, err = check(at(7), probe, 8081, s, f)
		assert.NoError(t, err, "path %q", p)
	}
}

func TestKernelBefore515(t *testing.T) {
	for release, want := range map[string]bool{
		"6.18.44-fc-v595": false, "5.15.0-91-generic": false, "5.14.21-150500.55-default": true,
		"4.18.0-553.el8_10.x86_64": true, "5.4.0": true, "6.1": false, "10.0.1": false, "5.15+": false, "garbage": true,
	} {
		assert.Equal(t, want, kernelBefore(release, 5, 15), release)
	}
}

// A listener in a container engine's cgroup (a docker run engine's port is
// published by docker-proxy in docker.service, or served from the
// container's own scope) is named, with what to run instead.
func TestAContainersListenerSaysWhatToRunInstead(t *testing.T) {
	for cg, container := range map[string]bool{
		"/system.slice/docker.service":                                       true,
		"/system.slice/docker-0123456789abcdef.scope":                        true,
		"/machine.slice/libpod-0123456789abcdef.scope":                       true,
		"/kubepods.slice/kubepods-burstable.slice/cri-containerd-0123.scope": true,
		"/system.slice/containerd.service":                                   true,
		"/user.slice/user-1000.slice/session-2.scope":                        false,
		"/system.slice/nginx.service":                                        false,
	} {
		e := &ForeignError{Addr: netip.MustParseAddr("127.0.0.1"), Port: 8081, Method: ByCgroup,
			Scope: Scope{Unit: "pool-engine-x.scope"}, Owner: Owner{UID: 0, CgroupID: 42}, OwnerCgroup: cg}
		msg := e.Error()
		assert.Contains(t, msg, "in cgroup "+cg, cg)
		if container {
			assert.Contains(t, msg, "podman run --rm --cgroups=split", cg)
		} else {
			assert.NotContains(t, msg, "podman", cg)
		}
	}
}
