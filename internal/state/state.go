// Package state keeps small JSON files that must never be seen half
// written: pool-managerd's persisted counters and its runtime records. A
// file that cannot be read back is set aside, not trusted and not fatal.
package state

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"time"
)

// Dir is a directory of <name>.json files.
type Dir struct {
	Path string
	// Mode is the mode of the files written (and, plus x bits, of Path).
	Mode fs.FileMode
	// NoSync skips the fsyncs: for files that need to outlive the daemon,
	// not the machine (the runtime records, in /run). The write is still
	// atomic.
	NoSync bool
}

func (d Dir) file(name string) string { return filepath.Join(d.Path, name+".json") }

// File is the path of name's file.
func (d Dir) File(name string) string { return d.file(name) }

// Save writes v as name.json atomically: a temporary file, fsync, rename,
// fsync of the directory.
func (d Dir) Save(name string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	if d.NoSync {
		return writeFile(d.file(name), append(b, '\n'), d.Mode, false)
	}
	return WriteFile(d.file(name), append(b, '\n'), d.Mode)
}

// Load reads name.json into v. found is false when there is no such file.
// A file that is unreadable, not valid JSON, or not a JSON object with at
// least one field (Save never writes null or {}) is renamed to
// name.json.corrupt-<unix time> and reported in err with found false, so
// the caller starts fresh and the operator can look at it.
func (d Dir) Load(name string, v any) (found bool, err error) {
	f := d.file(name)
	b, err := os.ReadFile(f)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err == nil {
		var fields map[string]json.RawMessage
		if err = json.Unmarshal(b, &fields); err == nil && len(fields) == 0 {
			err = errors.New("null or an empty object: nothing this daemon writes")
		}
		if err == nil {
			if err = json.Unmarshal(b, v); err == nil {
				return true, nil
			}
		}
	}
	return false, d.SetAside(name, err)
}

// SetAside renames name.json, found bad for why, to
// name.json.corrupt-<unix time> and returns the error that says so.
func (d Dir) SetAside(name string, why error) error {
	f := d.file(name)
	aside := fmt.Sprintf("%s.corrupt-%d", f, time.Now().Unix())
	if rerr := os.Rename(f, aside); rerr != nil {
		return fmt.Errorf("%s: %v; and it could not be set aside: %v", f, why, rerr)
	}
	return fmt.Errorf("%s: %v; set aside as %s", f, why, aside)
}

// maxHold bounds what Held reads back of a hold's reason.
const maxHold = 4 << 10

func (d Dir) holdFile(name string) string { return filepath.Join(d.Path, name+".held") }

// Hold records, durably, that name is held for why: a hold must outlive
// the daemon, or a restart would be a way around it. It lasts until
// Release.
func (d Dir) Hold(name, why string) error {
	if len(why) > maxHold {
		why = why[:maxHold]
	}
	return WriteFile(d.holdFile(name), []byte(why), d.Mode)
}

// Held returns why name is held, and whether it is. A hold file that cannot
// be read still holds.
func (d Dir) Held(name string) (why string, held bool) {
	f, err := os.Open(d.holdFile(name))
	if errors.Is(err, fs.ErrNotExist) {
		return "", false
	}
	if err != nil {
		return fmt.Sprintf("hold file %s unreadable: %v", d.holdFile(name), err), true
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxHold))
	if err != nil || len(b) == 0 {
		return fmt.Sprintf("held (hold file %s)", d.holdFile(name)), true
	}
	return string(b), true
}

// Release lifts name's hold; none is not an error.
func (d Dir) Release(name string) error {
	if err := os.Remove(d.holdFile(name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// Remove deletes name.json; a missing file is not an error.
func (d Dir) Remove(name string) error {
	if err := os.Remove(d.file(name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// WriteFile replaces path with data atomically and durably.
func WriteFile(path string, data []byte, mode fs.FileMode) error {
	return writeFile(path, data, mode, true)
}

func writeFile(path string, data []byte, mode fs.FileMode, durable bool) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, mode|0o111); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if durable {
		if err := tmp.Sync(); err != nil {
			tmp.Close()
			return err
		}
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	if !durable {
		return nil
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}
