// Package state keeps small JSON files that must never be seen half
// written: pool-managerd's persisted counters and its runtime records. A
// file that cannot be read back is set aside, not trusted and not fatal.
package state

import (
	"encoding/json"
	"errors"
	"fmt"
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
// A file that is unreadable or not valid JSON is renamed to
// name.json.corrupt-<unix time> and reported in err with found false, so
// the caller starts fresh and the operator can look at it.
func (d Dir) Load(name string, v any) (found bool, err error) {
	f := d.file(name)
	b, err := os.ReadFile(f)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err == nil {
		if err = json.Unmarshal(b, v); err == nil {
			return true, nil
		}
	}
	aside := fmt.Sprintf("%s.corrupt-%d", f, time.Now().Unix())
	if rerr := os.Rename(f, aside); rerr != nil {
		return false, fmt.Errorf("%s: %v; and it could not be set aside: %v", f, err, rerr)
	}
	return false, fmt.Errorf("%s: %v; set aside as %s", f, err, aside)
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
