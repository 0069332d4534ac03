package main

import (
	"encoding/xml"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/url"
	"os"
	"os/user"
	"path/filepath"
	"strings"
	"syscall"

	ifaces "github.com/llorch/pool-managerd/dbus"
	"github.com/llorch/pool-managerd/internal/config"
)

// BusPolicyDirs are where the system bus reads policy files
// (dbus-daemon(1)): the package's, then the operator's.
var BusPolicyDirs = []string{"/usr/share/dbus-1/system.d", "/etc/dbus-1/system.d"}

const (
	busName          = ifaces.BusName
	managerInterface = ifaces.ManagerInterface
)

// hostWarnings lists what the host lacks for the configuration to work
// under the installed unit: a bus policy for AdminGroup=, an IP allow list
// for a non-loopback MetricsListen= or HealthURL=, a textfile directory
// root can write without CAP_DAC_OVERRIDE; and an engine run as root. Each
// says what to add or change.
func hostWarnings(c *config.Config, busDirs []string) []string {
	var out []string
	m := c.Manager
	if w := adminGroupWarning(m.AdminGroup, busDirs); w != "" {
		out = append(out, w)
	}
	if m.MetricsListen != "" {
		if host, _, err := net.SplitHostPort(m.MetricsListen); err == nil && !loopback(host) {
			out = append(out, fmt.Sprintf("MetricsListen=%s: the unit allows only localhost (IPAddressAllow=localhost), so remote scrapers get no answer; "+
				"allow them with a drop-in, e.g. systemctl edit pool-managerd.service:\n[Service]\nIPAddressAllow=SCRAPER-ADDRESS", m.MetricsListen))
		}
	}
	for _, p := range c.Pools {
		if w := rootUserWarning(p); w != "" {
			out = append(out, w)
		}
		u, err := url.Parse(p.Specifiers("").Expand(p.Engine.HealthURL))
		if err != nil || u.Hostname() == "" || loopback(u.Hostname()) {
			continue
		}
		out = append(out, fmt.Sprintf("pool %s: HealthURL= host %s is not loopback: the unit allows only localhost (IPAddressAllow=localhost) and every probe would fail; "+
			"probe 127.0.0.1, or allow the address with a drop-in:\n[Service]\nIPAddressAllow=%s", p.ID, u.Hostname(), u.Hostname()))
	}
	if m.MetricsTextfile != "" {
		if w := textfileDirWarning(filepath.Dir(m.MetricsTextfile)); w != "" {
			out = append(out, w)
		}
	}
	return out
}

// rootUserWarning says when a pool's engine would run as root: allowed, but
// then whatever the engine's requests can reach (its model loader, its
// plugins) owns the host.
func rootUserWarning(p *config.Pool) string {
	name := p.Engine.User
	if name == "" {
		return ""
	}
	if name != "root" {
		if u, err := user.Lookup(name); err != nil || u.Uid != "0" {
			return ""
		}
	}
	return fmt.Sprintf("pool %s: User=%s runs the engine as root: a flaw in the engine or its model then owns the host; "+
		"run it as an unprivileged user (without User=, a user of the pool's own)", p.ID, name)
}

func loopback(host string) bool {
	if host == "localhost" {
		return true
	}
	a, err := netip.ParseAddr(host)
	return err == nil && a.IsLoopback()
}

// adminGroupWarning says what to add when group is not one the package's
// policy names and no policy file lets it call the Manager interface.
func adminGroupWarning(group string, dirs []string) string {
	if group == config.DefaultGroup {
		return ""
	}
	var notes []string
	if _, err := user.LookupGroup(group); err != nil {
		notes = append(notes, fmt.Sprintf("group %s does not exist on this host (groupadd %s)", group, group))
	}
	allowed, errs := busPolicyAllows(dirs, group)
	for _, err := range errs {
		notes = append(notes, err.Error())
	}
	if allowed && len(notes) == 0 {
		return ""
	}
	var b strings.Builder
	fmt.Fprintf(&b, "AdminGroup=%s: ", group)
	if !allowed {
		fmt.Fprintf(&b, "no D-Bus policy in %s lets group %s call %s, so its members get AccessDenied from the bus. Add %s:\n%s"+
			"then: busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig",
			strings.Join(dirs, " or "), group, managerInterface, BusPolicyDropIn(group), BusPolicy(group))
	}
	for _, n := range notes {
		fmt.Fprintf(&b, "\n  %s", n)
	}
	return b.String()
}

// BusPolicyDropIn is where the operator's policy for an admin group goes.
func BusPolicyDropIn(group string) string {
	return "/etc/dbus-1/system.d/pool-managerd-" + group + ".conf"
}

// BusPolicy is the policy file that lets members of group do what
// pool-admin's may.
func BusPolicy(group string) string {
	return `<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<!-- pool-managerd: AdminGroup=` + group + ` may change pools and take leases. -->
<busconfig>
  <policy group="` + group + `">
    <allow send_destination="` + busName + `"
           send_interface="` + managerInterface + `"/>
  </policy>
</busconfig>
`
}

type busConfig struct {
	Policies []struct {
		Group   string `xml:"group,attr"`
		Context string `xml:"context,attr"`
		Allow   []struct {
			Destination string `xml:"send_destination,attr"`
			Interface   string `xml:"send_interface,attr"`
			Member      string `xml:"send_member,attr"`
		} `xml:"allow"`
	} `xml:"policy"`
}

// busPolicyAllows reports whether a policy file in dirs lets members of
// group (or everyone) call every method of the Manager interface. A file
// that cannot be read or parsed is an error and is skipped.
func busPolicyAllows(dirs []string, group string) (bool, []error) {
	var errs []error
	allowed := false
	for _, d := range dirs {
		files, _ := filepath.Glob(filepath.Join(d, "*.conf"))
		for _, f := range files {
			data, err := os.ReadFile(f)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			var bc busConfig
			if err := xml.Unmarshal(data, &bc); err != nil {
				errs = append(errs, fmt.Errorf("%s: not a bus policy: %v", f, err))
				continue
			}
			for _, p := range bc.Policies {
				if p.Group != group && p.Context != "default" {
					continue
				}
				for _, a := range p.Allow {
					if (a.Destination == busName || a.Destination == "*") &&
						(a.Interface == "" || a.Interface == managerInterface) && a.Member == "" {
						allowed = true
					}
				}
			}
		}
	}
	return allowed, errs
}

// textfileDirWarning says when root, without CAP_DAC_OVERRIDE under the
// unit, cannot create the textfile in dir.
func textfileDirWarning(dir string) string {
	st, err := os.Stat(dir)
	if err != nil {
		return ""
	}
	s, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return ""
	}
	mode := st.Mode().Perm()
	if s.Uid == 0 && mode&0o300 == 0o300 || s.Gid == 0 && mode&0o030 == 0o030 || mode&0o003 == 0o003 {
		return ""
	}
	owner := fmt.Sprint(s.Uid)
	if u, err := user.LookupId(owner); err == nil {
		owner = u.Username
	}
	return fmt.Sprintf("MetricsTextfile=: %s (owner %s, mode %04o) is not writable by root without CAP_DAC_OVERRIDE, which the unit does not grant: "+
		"the textfile cannot be written there; make root its owner, or point MetricsTextfile= elsewhere", dir, owner, mode)
}

// printHostWarnings writes the warnings for --check-config.
func printHostWarnings(w io.Writer, c *config.Config) {
	for _, s := range hostWarnings(c, BusPolicyDirs) {
		fmt.Fprintf(w, "warning: %s\n", s)
	}
}
