package config

import (
	"bufio"
	"bytes"
	"cmp"
	"encoding/json"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/unit"

	"github.com/llorch/pool-managerd/internal/crash"
)

// option is one Key=value with where it stands: its file (a pool file or
// one of its drop-ins) and line.
type option struct {
	section, key, value string
	file                string
	line                int
}

// readUnit parses unit syntax with go-systemd and adds line numbers, which
// it does not track, plus the checks it leaves out (text before the first
// section, an empty section name).
func readUnit(file string, data []byte) ([]option, Errors) {
	var errs Errors
	lines, pre := optionLines(data)
	if pre > 0 {
		errs = append(errs, &Error{File: file, Line: pre, Msg: "text before the first [Section] header"})
	}
	opts, err := unit.DeserializeOptions(bytes.NewReader(data))
	if err != nil {
		return nil, append(errs, &Error{File: file, Line: syntaxLine(data), Msg: "syntax error: " + syntaxMsg(err)})
	}
	out := make([]option, len(opts))
	for i, o := range opts {
		out[i] = option{section: o.Section, key: o.Name, value: cleanValue(o.Value), file: file}
		if len(lines) == len(opts) {
			out[i].line = lines[i]
		}
		if o.Section == "" {
			errs = append(errs, &Error{File: file, Line: out[i].line, Msg: "empty section name []"})
		}
	}
	return out, errs
}

func syntaxMsg(err error) string {
	if err.Error() == "EOF" {
		return "unexpected end of file: a line without '=' (every line is [Section], Key=value, or a comment starting with # or ;)"
	}
	return err.Error()
}

// cleanValue joins continuation lines the way systemd does: the
// backslash-newline becomes a space.
func cleanValue(v string) string {
	return strings.TrimSpace(strings.ReplaceAll(v, "\\\n", " "))
}

// optionLines returns the line number of each option in the order
// go-systemd yields them, and the first line of text before any section.
func optionLines(data []byte) (lines []int, pre int) {
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 64*1024), len(data)+1)
	n, inSection, cont := 0, false, false
	for sc.Scan() {
		n++
		l := strings.TrimRight(sc.Text(), "\r")
		t := strings.TrimSpace(l)
		if cont {
			cont = strings.HasSuffix(strings.TrimRight(l, " "), "\\")
			continue
		}
		switch {
		case t == "":
		case t[0] == '#' || t[0] == ';':
			cont = strings.HasSuffix(strings.TrimRight(l, " "), "\\")
		case t[0] == '[':
			inSection = true
		case !inSection:
			if pre == 0 {
				pre = n
			}
		default:
			lines = append(lines, n)
			cont = strings.HasSuffix(l, "\\")
		}
	}
	return lines, pre
}

// decoder applies options to a value through a schema and collects errors.
type decoder struct {
	file string
	errs Errors
	opt  option
	// given holds "Section/Key" of every key set, valid or not, so that
	// whole-file checks do not repeat an error as a missing key.
	given map[string]bool
}

func (d *decoder) fail(format string, a ...any) {
	file := d.opt.file
	if file == "" {
		file = d.file
	}
	d.errs = append(d.errs, &Error{File: file, Line: d.opt.line, Section: d.opt.section, Key: d.opt.key, Msg: fmt.Sprintf(format, a...)})
}

func (d *decoder) failed(section, key string) bool {
	for _, e := range d.errs {
		if e.Section == section && e.Key == key {
			return true
		}
	}
	return false
}

// keyFunc applies one value; an error is reported against the option.
type keyFunc func(v string) error

type schema map[string]map[string]keyFunc

func (d *decoder) apply(opts []option, s schema, passthrough map[string]func(option)) {
	d.given = map[string]bool{}
	for _, o := range opts {
		d.opt = o
		d.given[o.section+"/"+o.key] = true
		keys, ok := s[o.section]
		if !ok {
			if f, ok := passthrough[o.section]; ok {
				f(o)
				continue
			}
			d.fail("unknown section (known: %s)%s", sectionNames(s, passthrough), sectionHint(s, passthrough, o.section))
			continue
		}
		f, ok := keys[o.key]
		if !ok {
			d.fail("unknown key in [%s]%s", o.section, keyHint(s, passthrough, o.section, o.key))
			continue
		}
		if err := f(o.value); err != nil {
			d.fail("%s", err)
		}
	}
}

func sectionNames(s schema, extra map[string]func(option)) string {
	var names []string
	for n := range s {
		names = append(names, "["+n+"]")
	}
	for n := range extra {
		names = append(names, "["+n+"]")
	}
	sort.Strings(names)
	return strings.Join(names, " ")
}

// Setters for the common value kinds.

func setString(p *string) keyFunc { return func(v string) error { *p = v; return nil } }

func setSeconds(p *time.Duration, positive bool) keyFunc {
	return func(v string) error {
		t, err := parseSeconds(v)
		if err != nil {
			return err
		}
		if positive && t <= 0 {
			return fmt.Errorf("must be more than 0, got %q", v)
		}
		*p = t
		return nil
	}
}

func setInt(p *int, lo, hi int64) keyFunc {
	return func(v string) error {
		n, err := parseInt(v, lo, hi)
		if err != nil {
			// Keep the default: a bad value is reported once, not again
			// as an impossible policy.
			return err
		}
		*p = int(n)
		return nil
	}
}

func setBool(p *bool) keyFunc {
	return func(v string) error {
		b, err := parseBool(v)
		if err == nil {
			*p = b
		}
		return err
	}
}

func setAbsPath(p *string, allowEmpty bool) keyFunc {
	return func(v string) error {
		if v == "" && allowEmpty {
			*p = ""
			return nil
		}
		if !filepath.IsAbs(v) {
			return fmt.Errorf("%q is not an absolute path", v)
		}
		*p = filepath.Clean(v)
		return nil
	}
}

// parseWarmup reads "METHOD /path [body]": GET or POST, an absolute path,
// the rest (JSON, if anything) is the body.
func parseWarmup(v string) (*WarmupRequest, error) {
	method, rest, _ := strings.Cut(strings.TrimSpace(v), " ")
	path, body, _ := strings.Cut(strings.TrimSpace(rest), " ")
	body = strings.TrimSpace(body)
	switch {
	case method != "GET" && method != "POST":
		return nil, fmt.Errorf("%q: the method must be GET or POST", v)
	case !strings.HasPrefix(path, "/") || strings.ContainsAny(path, " \t#"):
		return nil, fmt.Errorf("%q: the path must start with /", v)
	case method == "GET" && body != "":
		return nil, fmt.Errorf("%q: a GET has no body", v)
	case body != "" && !json.Valid([]byte(body)):
		return nil, fmt.Errorf("%q: the body is not JSON", v)
	}
	return &WarmupRequest{Method: method, Path: path, Body: body}, nil
}

func withSpecifiers(p *string) keyFunc {
	return func(v string) error {
		if err := checkSpecifiers(v); err != nil {
			return err
		}
		*p = v
		return nil
	}
}

func setCommand(p *[]string) keyFunc {
	return func(v string) error {
		if err := checkSpecifiers(v); err != nil {
			return err
		}
		w, err := splitWords(v)
		if err != nil {
			return fmt.Errorf("cannot split command line: %w", err)
		}
		if len(w) == 0 {
			*p = nil
			return nil
		}
		*p = w
		return nil
	}
}

// ParsePool parses one pool file; the id is the file name's stem. It
// returns every problem found; the pool is nil when there was any.
func ParsePool(file string, data []byte) (*Pool, Errors) {
	return parsePool(file, data, nil)
}

// DropIn is one drop-in of a pool file: its path and contents.
type DropIn struct {
	File string
	Data []byte
}

// parsePool parses a pool file and then its drop-ins, in order, as if
// each drop-in's lines followed the file's: a later value replaces an
// earlier one, and list keys add to it (an empty value clears), as with
// systemd's. Errors name the file that holds the line.
func parsePool(file string, data []byte, dropIns []DropIn) (*Pool, Errors) {
	id := strings.TrimSuffix(filepath.Base(file), PoolSuffix)
	d := &decoder{file: file}
	if !ValidPoolID(id) {
		d.errs = append(d.errs, &Error{File: file, Msg: fmt.Sprintf("pool id %q (the file name without .pool) must be 1 to 64 characters of A-Z a-z 0-9 _ -", id)})
	}
	opts, errs := readUnit(file, data)
	d.errs = append(d.errs, errs...)
	if opts == nil && len(errs) > 0 {
		return nil, withLines(d.errs, file, data)
	}
	for _, di := range dropIns {
		more, errs := readUnit(di.File, di.Data)
		d.errs = append(d.errs, errs...)
		opts = append(opts, more...)
	}
	p := defaultPool(id, file)
	for _, di := range dropIns {
		p.DropIns = append(p.DropIns, di.File)
	}
	r := &p.Restart
	mult := &r.Backoff.Multiplier
	multDefault := true
	s := schema{
		"Pool": {
			"Description": setString(&p.Description),
			"Devices": func(v string) error {
				p.devicesAt = fmt.Sprintf("%s:%d", cmp.Or(d.opt.file, file), d.opt.line)
				var bad []string
				for _, dev := range strings.Fields(v) {
					if err := parseDevice(dev); err != nil {
						bad = append(bad, err.Error())
						continue
					}
					if !slices.Contains(p.Devices, dev) {
						p.Devices = append(p.Devices, dev)
					}
				}
				if v == "" {
					p.Devices = nil
				}
				if len(bad) > 0 {
					return fmt.Errorf("%s", strings.Join(bad, "; "))
				}
				return nil
			},
			"Model": func(v string) error {
				if v == "" {
					return fmt.Errorf("must not be empty")
				}
				p.Model = v
				return nil
			},
			"ModelDigest": func(v string) error {
				if v != "" && !digestRe.MatchString(v) {
					return fmt.Errorf("%q is not sha256:<64 lower-case hex digits>", v)
				}
				p.ModelDigest = v
				return nil
			},
			"Slots": func(v string) error {
				n, err := parseInt(v, 0, 1<<20)
				if err == nil {
					p.Slots = uint32(n)
				}
				return err
			},
			"AutoStart": setBool(&p.AutoStart),
			"IdleStopSec": func(v string) error {
				if v == "" {
					p.IdleStop = 0
					return nil
				}
				t, err := parseSeconds(v)
				if err == nil && t > 0 && t < time.Second {
					err = fmt.Errorf("must be 0 (never idle) or at least 1s, got %q", v)
				}
				if err == nil {
					p.IdleStop = t
				}
				return err
			},
			"Pin":          setBool(&p.Pin),
			"StartOnLease": setBool(&p.StartOnLease),
			"Group": func(v string) error {
				if v != "" && !ValidPoolID(v) {
					return fmt.Errorf("group name %q must be 1 to 64 characters of A-Z a-z 0-9 _ -", v)
				}
				p.Group = v
				return nil
			},
			"GroupDrainSec": setSeconds(&p.GroupDrain, false),
			"MemoryRequired": func(v string) error {
				if v == "" {
					p.MemoryRequired = nil
					return nil
				}
				if v == "infinity" {
					return fmt.Errorf("%q: no GPU has infinite memory (0 turns the check off)", v)
				}
				n, err := parseBytes(v)
				if err != nil {
					return err
				}
				b := n.(uint64)
				p.MemoryRequired = &b
				return nil
			},
		},
		"Engine": {
			"ExecStart": setCommand(&p.Engine.ExecStart),
			"Port":      setInt(&p.Engine.Port, 1, 65535),
			"HealthURL": withSpecifiers(&p.Engine.HealthURL),
			"User": func(v string) error {
				if v == "" {
					p.Engine.User = ""
					return nil
				}
				if !userRe.MatchString(v) {
					return fmt.Errorf("%q is not a valid user name", v)
				}
				p.Engine.User = v
				return nil
			},
			"DeviceIDs": func(v string) error {
				for _, k := range []DeviceIDs{DeviceIDsUUID, DeviceIDsIndex} {
					if v == string(k) {
						p.Engine.DeviceIDs = k
						return nil
					}
				}
				return fmt.Errorf("%q is not uuid or index%s", v, didYouMean(v, "uuid", "index"))
			},
			"Environment": func(v string) error {
				if v == "" {
					p.Engine.Environment = nil
					return nil
				}
				if err := checkSpecifiers(v); err != nil {
					return err
				}
				w, err := splitWords(v)
				if err != nil {
					return err
				}
				for _, a := range w {
					name, _, ok := strings.Cut(a, "=")
					if !ok || !envNameRe.MatchString(name) {
						return fmt.Errorf("%q is not NAME=value", a)
					}
					if name == "CUDA_VISIBLE_DEVICES" || name == "NVIDIA_VISIBLE_DEVICES" {
						return fmt.Errorf("%s is set by pool-managerd from Devices=", name)
					}
					p.Engine.Environment = append(p.Engine.Environment, a)
				}
				return nil
			},
			"StopTimeoutSec": setSeconds(&p.Engine.StopTimeout, true),
			"Version":        setString(&p.Engine.Version),
			"VersionCommand": setCommand(&p.Engine.VersionCommand),
			"Sleep": func(v string) error {
				for _, k := range []Sleep{SleepNone, SleepVLLM} {
					if v == string(k) {
						p.Engine.Sleep = k
						return nil
					}
				}
				return fmt.Errorf("%q is not none or vllm%s", v, didYouMean(v, "none", "vllm"))
			},
			"SleepLevel": setInt(&p.Engine.SleepLevel, 1, 2),
		},
		"Health": {
			"IntervalSec":      setSeconds(&p.Health.Interval, true),
			"TimeoutSec":       setSeconds(&p.Health.Timeout, true),
			"FailureThreshold": setInt(&p.Health.FailureThreshold, 1, 1000),
			"StartTimeoutSec":  setSeconds(&p.Health.StartTimeout, true),
			"ProgressURL":      withSpecifiers(&p.Health.ProgressURL),
			"StallSec":         setSeconds(&p.Health.Stall, true),
			"WarmupRequest": func(v string) error {
				w, err := parseWarmup(v)
				if err == nil {
					p.Health.Warmup = w
				}
				return err
			},
			"WarmupTimeoutSec": setSeconds(&p.Health.WarmupTimeout, true),
			"CanaryRequest": func(v string) error {
				c, err := parseWarmup(v)
				if err == nil {
					p.Health.Canary = c
				}
				return err
			},
			"CanaryIdleSec":    setSeconds(&p.Health.CanaryIdle, true),
			"CanaryTimeoutSec": setSeconds(&p.Health.CanaryTimeout, true),
		},
		"Restart": {
			"BackoffInitialSec": setSeconds(&r.Backoff.Initial, true),
			"BackoffMaxSec":     setSeconds(&r.Backoff.Max, true),
			"BackoffMinSec":     setSeconds(&r.Backoff.Min, false),
			"JitterPercent": func(v string) error {
				f, err := parseFloat(v, 0, 99)
				if err == nil {
					r.Backoff.JitterPercent = f
				}
				return err
			},
			"StableSec": setSeconds(&r.Backoff.Stable, true),
			"Multiplier": func(v string) error {
				if multDefault {
					*mult = map[crash.Reason]float64{}
					multDefault = false
				}
				if v == "" {
					*mult = map[crash.Reason]float64{}
					return nil
				}
				for _, w := range strings.Fields(v) {
					name, factor, ok := strings.Cut(w, ":")
					if !ok {
						return fmt.Errorf("%q is not reason:factor (e.g. cuda_error:2)", w)
					}
					reason, err := crash.ParseReason(name)
					if err != nil {
						return err
					}
					f, err := parseFloat(factor, 0.01, 1000)
					if err != nil {
						return fmt.Errorf("factor for %s: %w", name, err)
					}
					(*mult)[reason] = f
				}
				return nil
			},
			"BreakerThreshold":     setInt(&r.Breaker.Threshold, 1, 1000),
			"BreakerOpenSec":       setSeconds(&r.Breaker.Open, true),
			"BreakerOpenMaxSec":    setSeconds(&r.Breaker.OpenMax, true),
			"BreakerStableSec":     setSeconds(&r.Breaker.Stable, true),
			"StormMaxRestarts":     setInt(&r.Storm.Max, 1, 10000),
			"StormWindowSec":       setSeconds(&r.Storm.Window, true),
			"RestartCountResetSec": setSeconds(&r.RestartCountReset, true),
		},
	}
	passthrough := map[string]func(option){
		"Scope": func(o option) {
			d.opt = o
			sp, err := parseScopeProperty(o.key, o.value)
			if err != nil {
				d.fail("%s%s", err, scopeHint(s, o.key))
				return
			}
			p.Scope = append(p.Scope, sp)
		},
	}
	d.apply(opts, s, passthrough)
	seen := d.given

	// Whole-pool checks, reported against the key that must change.
	d.opt = option{}
	need := func(section, key, msg string) {
		d.errs = append(d.errs, lastSet(opts, &Error{File: file, Section: section, Key: key, Msg: msg}))
	}
	if !seen["Engine/ExecStart"] {
		need("Engine", "ExecStart", "missing: the engine's command line is required")
	} else if len(p.Engine.ExecStart) == 0 && !d.failed("Engine", "ExecStart") {
		need("Engine", "ExecStart", "empty: the engine's command line is required")
	}
	if !seen["Pool/Model"] {
		need("Pool", "Model", "missing: the model path or name is required")
	}
	if p.Pin && p.Group != "" {
		need("Pool", "Pin", fmt.Sprintf("yes keeps the engine up, but a member of Group=%s gives its GPUs to the member asked for: set one or the other", p.Group))
	}
	if len(p.Devices) == 0 && !d.failed("Pool", "Devices") {
		need("Pool", "Devices", "missing: a pool needs at least one GPU (an index, GPU- or MIG- UUID)")
	}
	if p.Engine.Sleep == SleepVLLM && !seen["Engine/Port"] {
		need("Engine", "Sleep", "vllm needs Port=: sleep and wake are asked of the engine's own port on loopback")
	}
	usesPort := strings.Contains(strings.Join(p.Engine.ExecStart, " ")+p.Engine.HealthURL+p.Health.ProgressURL, "%p")
	if usesPort && !seen["Engine/Port"] {
		need("Engine", "Port", "missing: ExecStart=, HealthURL= or ProgressURL= uses %p")
	}
	switch {
	case p.Health.ProgressURL != "" && p.Health.Stall == 0 && !d.failed("Health", "StallSec"):
		need("Health", "StallSec", "missing: ProgressURL= needs StallSec=, how long requests in flight may produce no token")
	case p.Health.ProgressURL == "" && p.Health.Stall > 0 && !d.failed("Health", "ProgressURL"):
		need("Health", "ProgressURL", "missing: StallSec= needs ProgressURL=, the engine's metrics endpoint")
	case p.Health.ProgressURL != "":
		if u, err := url.Parse(p.Specifiers("").Expand(p.Health.ProgressURL)); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			need("Health", "ProgressURL", fmt.Sprintf("%q is not an http:// or https:// URL", p.Health.ProgressURL))
		}
	}
	switch {
	case p.Health.Canary != nil && p.Health.CanaryIdle == 0 && !d.failed("Health", "CanaryIdleSec"):
		need("Health", "CanaryIdleSec", "missing: CanaryRequest= needs CanaryIdleSec=, how long the pool must be idle before it is sent")
	case p.Health.Canary == nil && (p.Health.CanaryIdle > 0 || p.Health.CanaryTimeout > 0) && !d.failed("Health", "CanaryRequest"):
		key := "CanaryIdleSec"
		if p.Health.CanaryIdle == 0 {
			key = "CanaryTimeoutSec"
		}
		need("Health", "CanaryRequest", "missing: "+key+"= needs CanaryRequest=, the request to send")
	}
	switch {
	case p.Engine.HealthURL != "":
		if u, err := url.Parse(p.Specifiers("").Expand(p.Engine.HealthURL)); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			need("Engine", "HealthURL", fmt.Sprintf("%q is not an http:// or https:// URL", p.Engine.HealthURL))
		}
	case d.failed("Engine", "HealthURL"):
		// A HealthURL= that was refused is reported already, not missing.
	case !seen["Engine/Port"]:
		need("Engine", "HealthURL", "missing: set HealthURL= or Port= (the default probe is http://127.0.0.1:%p/health)")
	default:
		p.Engine.HealthURL = "http://127.0.0.1:%p/health"
	}
	if p.Engine.DeviceIDs == DeviceIDsIndex {
		for _, dev := range p.Devices {
			if isMIG(dev) {
				need("Engine", "DeviceIDs", fmt.Sprintf("index: MIG device %s has no index CUDA_VISIBLE_DEVICES can name (set DeviceIDs=uuid)", dev))
			}
		}
		for _, e := range p.Engine.Environment {
			if strings.HasPrefix(e, "CUDA_DEVICE_ORDER=") {
				need("Engine", "Environment", "CUDA_DEVICE_ORDER is set by pool-managerd with DeviceIDs=index: CUDA must number the GPUs as NVML does")
			}
		}
	}
	if p.Engine.Version != "" && len(p.Engine.VersionCommand) > 0 {
		need("Engine", "VersionCommand", "set Version= or VersionCommand=, not both")
	}
	if p.Health.Timeout > p.Health.Interval {
		need("Health", "TimeoutSec", fmt.Sprintf("%s is longer than IntervalSec= (%s): probes would overlap", p.Health.Timeout, p.Health.Interval))
	}
	if err := p.Restart.Validate(); err != nil {
		for _, e := range strings.Split(err.Error(), "\n") {
			need("Restart", "", e)
		}
	}
	if len(d.errs) > 0 {
		return nil, withLines(d.errs, file, data)
	}
	return p, nil
}

func parseManager(file string, data []byte, m *Manager) Errors {
	d := &decoder{file: file}
	opts, errs := readUnit(file, data)
	d.errs = append(d.errs, errs...)
	if opts == nil && len(errs) > 0 {
		return d.errs
	}
	inv := &m.Inventory
	s := schema{
		"Manager": {
			"StateDir":   setAbsPath(&m.StateDir, false),
			"RuntimeDir": setAbsPath(&m.RuntimeDir, false),
			"CacheDir":   setAbsPath(&m.CacheDir, false),
			"ModelsDir":  setAbsPath(&m.ModelsDir, false),
			"ModelDirs": func(v string) error {
				if v == "" {
					m.ModelDirs = nil
					return nil
				}
				dirs := strings.Fields(v)
				for _, d := range dirs {
					if !filepath.IsAbs(d) {
						return fmt.Errorf("%q is not an absolute path", d)
					}
				}
				for _, d := range dirs {
					if d = filepath.Clean(d); !slices.Contains(m.ModelDirs, d) {
						m.ModelDirs = append(m.ModelDirs, d)
					}
				}
				return nil
			},
			"MetricsTextfile":    setAbsPath(&m.MetricsTextfile, true),
			"MetricsIntervalSec": setSeconds(&m.MetricsInterval, true),
			"MetricsListen": func(v string) error {
				if v == "" {
					m.MetricsListen = ""
					return nil
				}
				if _, port, err := net.SplitHostPort(v); err != nil || port == "" {
					return fmt.Errorf("%q is not host:port (e.g. 127.0.0.1:9464)", v)
				}
				m.MetricsListen = v
				return nil
			},
			"EngineUIDs": func(v string) error {
				r, err := parseUIDRange(v)
				if err == nil {
					m.EngineUIDs = r
				}
				return err
			},
			"AdminGroup": func(v string) error {
				if !userRe.MatchString(v) {
					return fmt.Errorf("%q is not a valid group name", v)
				}
				m.AdminGroup = v
				return nil
			},
		},
		"Inventory": {
			"GPUResetCommand": func(v string) error {
				w, err := splitWords(v)
				if err != nil {
					return fmt.Errorf("cannot split command line: %w", err)
				}
				if len(w) > 0 && !filepath.IsAbs(w[0]) {
					return fmt.Errorf("%q: the command must be an absolute path", w[0])
				}
				inv.GPUResetCommand = w
				return nil
			},
			"Backend": func(v string) error {
				switch b := Backend(v); b {
				case BackendAuto, BackendNVML, BackendStatic:
					inv.Backend = b
					return nil
				}
				return fmt.Errorf("%q is not auto, nvml or static", v)
			},
			"Device": func(v string) error {
				if v == "" {
					inv.Devices = nil
					return nil
				}
				f := strings.Fields(v)
				if len(f) != 3 {
					return fmt.Errorf("%q is not INDEX UUID NODE (e.g. 0 GPU-8f2c1a70-0000-4000-8000-000000000000 /dev/nvidia0)", v)
				}
				idx, err := parseInt(f[0], 0, 1023)
				if err != nil {
					return fmt.Errorf("index: %w", err)
				}
				if !uuidRe.MatchString(f[1]) {
					return fmt.Errorf("%q is not a GPU-<uuid> or MIG-<uuid>", f[1])
				}
				if !strings.HasPrefix(f[2], "/dev/") || filepath.Clean(f[2]) != f[2] {
					return fmt.Errorf("device node %q is not a path under /dev", f[2])
				}
				for _, o := range inv.Devices {
					if o.Index == int(idx) || strings.EqualFold(o.UUID, f[1]) || o.Node == f[2] {
						return fmt.Errorf("GPU %s is listed twice", v)
					}
				}
				inv.Devices = append(inv.Devices, StaticDevice{Index: int(idx), UUID: f[1], Node: f[2]})
				return nil
			},
			"ControlDevice": func(v string) error {
				if v == "" {
					inv.ControlDevices = nil
					return nil
				}
				if !strings.HasPrefix(v, "/dev/") || filepath.Clean(v) != v {
					return fmt.Errorf("%q is not a path under /dev", v)
				}
				if !slices.Contains(inv.ControlDevices, v) {
					inv.ControlDevices = append(inv.ControlDevices, v)
				}
				return nil
			},
		},
	}
	d.apply(opts, s, nil)
	if inv.Backend == BackendStatic && len(inv.Devices) == 0 {
		d.errs = append(d.errs, &Error{File: file, Section: "Inventory", Key: "Device", Msg: "Backend=static needs at least one Device= line"})
	}
	return withLines(d.errs, file, data)
}
