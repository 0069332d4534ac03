package main

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/llorch/pool-managerd/internal/config"
)

// completeModels prints the model refs that begin with the prefix, for
// the shell's completion: only beneath the daemon's ModelsDir (refs
// relative to it) and its ModelDirs= (absolute), never the current
// directory. Directories end in "/". Nothing is printed when the
// configuration cannot be read.
func (c *cli) completeModels(args []string) error {
	mgr, err := managerConfig(c.configDir)
	if err != nil {
		return quietFailure
	}
	for _, m := range modelCandidates(mgr.ModelsDir, mgr.ModelDirs, args[0]) {
		fmt.Fprintln(c.stdout, m)
	}
	return nil
}

// managerConfig reads the manager's settings as the daemon does: its
// file, then its drop-ins in name order.
func managerConfig(dir string) (config.Manager, error) {
	var files []string
	if f := filepath.Join(dir, config.ManagerFile); exists(f) {
		files = append(files, f)
	}
	dropIns, _ := filepath.Glob(filepath.Join(dir, config.ManagerFile+".d", "*.conf"))
	cfg, err := config.LoadFiles(append(files, dropIns...), nil)
	if err != nil {
		return config.Manager{}, err
	}
	return cfg.Manager, nil
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// modelCandidates lists the entries that complete prefix: relative to
// modelsDir, or absolute beneath one of the allowed directories (which
// are themselves offered while prefix is a beginning of one).
func modelCandidates(modelsDir string, dirs []string, prefix string) []string {
	var out []string
	if !strings.HasPrefix(prefix, "/") {
		if modelsDir == "" || strings.Contains("/"+prefix, "/../") || strings.HasSuffix(prefix, "..") {
			return nil
		}
		for _, e := range entries(modelsDir, prefix) {
			out = append(out, e)
		}
		return out
	}
	allowed := append([]string{modelsDir}, dirs...)
	for _, d := range allowed {
		if d == "" || !filepath.IsAbs(d) {
			continue
		}
		d = filepath.Clean(d)
		switch {
		case strings.HasPrefix(prefix, d+"/"):
			rel := strings.TrimPrefix(prefix, d+"/")
			if strings.Contains("/"+rel, "/../") || strings.HasSuffix(rel, "..") {
				continue
			}
			for _, e := range entries(d, rel) {
				out = append(out, d+"/"+e)
			}
		case strings.HasPrefix(d+"/", prefix):
			out = append(out, d+"/")
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// entries are the names in base/dir(rel) that begin with rel's last
// element, as paths relative to base; hidden ones only when asked for.
func entries(base, rel string) []string {
	dir, part := filepath.Split(rel)
	list, err := os.ReadDir(filepath.Join(base, dir))
	if err != nil {
		return nil
	}
	var out []string
	for _, e := range list {
		name := e.Name()
		if !strings.HasPrefix(name, part) || strings.HasPrefix(name, ".") && !strings.HasPrefix(part, ".") {
			continue
		}
		isDir := e.IsDir()
		if e.Type()&os.ModeSymlink != 0 {
			if fi, err := os.Stat(filepath.Join(base, dir, name)); err == nil {
				isDir = fi.IsDir()
			}
		}
		if isDir {
			name += "/"
		}
		out = append(out, dir+name)
	}
	return out
}
