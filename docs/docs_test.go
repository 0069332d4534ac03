// Package docs holds the design documents; its test keeps them true to
// the repository: links resolve, quoted paths, tests and identifiers
// exist, and nothing points outside the repository.
package docs

import (
	"bytes"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// root is the repository's top directory.
func root(t *testing.T) string {
	t.Helper()
	r, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(r, "go.mod")); err != nil {
		t.Fatalf("no go.mod above docs/: %v", err)
	}
	return r
}

// repoFiles lists the repository's files, relative to root: git's tracked
// files where git can say, else every file but .git's and build outputs.
func repoFiles(t *testing.T, root string) []string {
	t.Helper()
	if out, err := exec.Command("git", "-C", root, "ls-files", "-z").Output(); err == nil && len(out) > 0 {
		var files []string
		for _, f := range strings.Split(strings.TrimRight(string(out), "\x00"), "\x00") {
			if _, err := os.Lstat(filepath.Join(root, f)); err == nil {
				files = append(files, f)
			}
		}
		return files
	}
	var files []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if d.IsDir() && (rel == ".git" || rel == "build") {
			return filepath.SkipDir
		}
		if d.Type().IsRegular() {
			files = append(files, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// A user's clone is the whole project: no file may send its reader to a
// document beside the repository. (The strings are split so that this
// file does not hold them.)
func TestNothingPointsOutsideTheRepository(t *testing.T) {
	r := root(t)
	outside := []string{".." + "/shared", "DESIGN" + ".md"}
	files := repoFiles(t, r)
	if len(files) < 50 {
		t.Fatalf("only %d files found in %s", len(files), r)
	}
	for _, f := range files {
		b, err := os.ReadFile(filepath.Join(r, f))
		if err != nil {
			t.Errorf("%s: %v", f, err)
			continue
		}
		for _, s := range outside {
			for off := 0; ; {
				i := bytes.Index(b[off:], []byte(s))
				if i < 0 {
					break
				}
				off += i + len(s)
				t.Errorf("%s:%d points outside the repository (%q)", f, bytes.Count(b[:off], []byte("\n"))+1, s)
			}
		}
	}
}

// markdown returns README.md and the pages in docs/, relative to root.
func markdown(t *testing.T, root string) []string {
	t.Helper()
	pages, err := filepath.Glob(filepath.Join(root, "docs", "*.md"))
	if err != nil || len(pages) == 0 {
		t.Fatalf("no pages in docs/: %v", err)
	}
	files := []string{"README.md"}
	for _, p := range pages {
		rel, _ := filepath.Rel(root, p)
		files = append(files, rel)
	}
	return files
}

var (
	fence    = regexp.MustCompile("(?ms)^\\s*```.*?^\\s*```[^\\n]*$")
	codeSpan = regexp.MustCompile("`([^`\n]+)`")
	link     = regexp.MustCompile(`\]\(([^)\s]+)(?:\s+"[^"]*")?\)`)
	refDef   = regexp.MustCompile(`(?m)^\s*\[[^\]]+\]:\s*(\S+)`)
	scheme   = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9+.-]*:`)
	heading  = regexp.MustCompile(`(?m)^#{1,6}\s+(.+?)\s*#*\s*$`)
)

// prose is a page without its fenced code blocks.
func prose(b []byte) string { return fence.ReplaceAllString(string(b), "") }

// slug is a heading's anchor as GitHub makes it.
func slug(h string) string {
	h = strings.ToLower(strings.ReplaceAll(h, "`", ""))
	var b strings.Builder
	for _, r := range h {
		switch {
		case r == ' ':
			b.WriteByte('-')
		case r == '-' || r == '_' || r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r > 127:
			b.WriteRune(r)
		}
	}
	return b.String()
}

func anchors(text string) map[string]bool {
	out := map[string]bool{}
	for _, m := range heading.FindAllStringSubmatch(text, -1) {
		out[slug(m[1])] = true
	}
	return out
}

// Every relative link of README.md and docs/ leads to a file or directory
// of the repository (and, with a #fragment, to a heading of that page).
func TestRelativeLinksResolve(t *testing.T) {
	r := root(t)
	for _, f := range markdown(t, r) {
		b, err := os.ReadFile(filepath.Join(r, f))
		if err != nil {
			t.Fatal(err)
		}
		text := codeSpan.ReplaceAllString(prose(b), "")
		var targets []string
		for _, m := range link.FindAllStringSubmatch(text, -1) {
			targets = append(targets, m[1])
		}
		for _, m := range refDef.FindAllStringSubmatch(text, -1) {
			targets = append(targets, m[1])
		}
		for _, target := range targets {
			if scheme.MatchString(target) {
				continue
			}
			path, frag, _ := strings.Cut(target, "#")
			page := filepath.Join(r, f)
			if path != "" {
				page = filepath.Join(r, filepath.Dir(f), filepath.FromSlash(path))
				rel, err := filepath.Rel(r, page)
				if err != nil || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
					t.Errorf("%s: link %q leaves the repository", f, target)
					continue
				}
				if _, err := os.Stat(page); err != nil {
					t.Errorf("%s: link %q: no such file in the repository", f, target)
					continue
				}
			}
			if frag == "" || !strings.HasSuffix(page, ".md") {
				continue
			}
			pb, err := os.ReadFile(page)
			if err != nil {
				t.Errorf("%s: link %q: %v", f, target, err)
				continue
			}
			if !anchors(prose(pb))[frag] {
				t.Errorf("%s: link %q: no such heading", f, target)
			}
		}
	}
}

// decls is what a Go package declares: its top-level names, and the
// methods and fields of each of its types.
type decls struct {
	top     map[string]bool
	members map[string]map[string]bool
}

// packages parses every non-test Go file under internal/ and returns each
// package name's declarations.
func packages(t *testing.T, root string) map[string]*decls {
	t.Helper()
	pkgs := map[string]*decls{}
	fset := token.NewFileSet()
	err := filepath.WalkDir(filepath.Join(root, "internal"), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && d.Name() == "testdata" {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(p, ".go") || strings.HasSuffix(p, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, p, nil, parser.SkipObjectResolution)
		if err != nil {
			return err
		}
		dc := pkgs[f.Name.Name]
		if dc == nil {
			dc = &decls{top: map[string]bool{}, members: map[string]map[string]bool{}}
			pkgs[f.Name.Name] = dc
		}
		member := func(typ, name string) {
			if dc.members[typ] == nil {
				dc.members[typ] = map[string]bool{}
			}
			dc.members[typ][name] = true
		}
		for _, decl := range f.Decls {
			switch x := decl.(type) {
			case *ast.FuncDecl:
				if x.Recv == nil || len(x.Recv.List) == 0 {
					dc.top[x.Name.Name] = true
					continue
				}
				typ := x.Recv.List[0].Type
				for {
					switch e := typ.(type) {
					case *ast.StarExpr:
						typ = e.X
						continue
					case *ast.IndexExpr:
						typ = e.X
						continue
					case *ast.IndexListExpr:
						typ = e.X
						continue
					}
					break
				}
				if id, ok := typ.(*ast.Ident); ok {
					member(id.Name, x.Name.Name)
				}
			case *ast.GenDecl:
				for _, spec := range x.Specs {
					switch s := spec.(type) {
					case *ast.ValueSpec:
						for _, n := range s.Names {
							dc.top[n.Name] = true
						}
					case *ast.TypeSpec:
						dc.top[s.Name.Name] = true
						st, ok := s.Type.(*ast.StructType)
						if !ok {
							continue
						}
						for _, fl := range st.Fields.List {
							for _, n := range fl.Names {
								member(s.Name.Name, n.Name)
							}
							if len(fl.Names) == 0 {
								typ := fl.Type
								if s, ok := typ.(*ast.StarExpr); ok {
									typ = s.X
								}
								switch e := typ.(type) {
								case *ast.Ident:
									member(s.Name.Name, e.Name)
								case *ast.SelectorExpr:
									member(s.Name.Name, e.Sel.Name)
								}
							}
						}
					}
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return pkgs
}

// testNames are the Test and Fuzz functions of the repository.
func testNames(t *testing.T, root string, files []string) map[string]bool {
	t.Helper()
	decl := regexp.MustCompile(`(?m)^func ((?:Test|Fuzz)\w+)\(`)
	names := map[string]bool{}
	for _, f := range files {
		if !strings.HasSuffix(f, "_test.go") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(root, f))
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range decl.FindAllSubmatch(b, -1) {
			names[string(m[1])] = true
		}
	}
	return names
}

var (
	quotedPath = regexp.MustCompile(`^(?:cmd|internal|test|tools|dbus|packaging|systemd|docs)/[A-Za-z0-9_./-]*$`)
	quotedTest = regexp.MustCompile(`^(?:Test|Fuzz)[A-Z0-9]\w*$`)
	// pkg.Name or pkg.Type.Member, and Type.Member.
	quotedPkgIdent  = regexp.MustCompile(`^([a-z][a-z0-9]*)\.([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?$`)
	quotedTypeIdent = regexp.MustCompile(`^([A-Z]\w*)\.([A-Za-z_]\w*)$`)
	// A file name looks like an identifier: README.md, model.gguf.
	fileName = regexp.MustCompile(`\.(?:md|go|json|conf|service|scope|slice|xml|sock|pool|gguf|yml|yaml|txt|sh|deb|rpm|prom|feature|catalog|events)$`)
)

// The pages quote code by name: each repository path, test and Go
// identifier quoted in docs/ must exist, so that a rename shows here and
// not to a reader.
func TestQuotedNamesExist(t *testing.T) {
	r := root(t)
	files := repoFiles(t, r)
	tests := testNames(t, r, files)
	pkgs := packages(t, r)
	checked := 0
	for _, f := range markdown(t, r) {
		if !strings.HasPrefix(f, "docs"+string(filepath.Separator)) {
			continue
		}
		b, err := os.ReadFile(filepath.Join(r, f))
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range codeSpan.FindAllStringSubmatch(prose(b), -1) {
			q := m[1]
			checked++
			switch {
			case fileName.MatchString(q) && !quotedPath.MatchString(q):
			case quotedPath.MatchString(q):
				if _, err := os.Stat(filepath.Join(r, filepath.FromSlash(q))); err != nil {
					t.Errorf("%s: `%s`: no such path", f, q)
				}
			case quotedTest.MatchString(q):
				if !tests[q] {
					t.Errorf("%s: `%s`: no such test", f, q)
				}
			case quotedPkgIdent.MatchString(q):
				p := quotedPkgIdent.FindStringSubmatch(q)
				dc := pkgs[p[1]]
				if dc == nil {
					continue // not one of ours (org.freedesktop..., memory.events)
				}
				if !dc.top[p[2]] {
					t.Errorf("%s: `%s`: package %s declares no %s", f, q, p[1], p[2])
					continue
				}
				if p[3] != "" && !dc.members[p[2]][p[3]] {
					t.Errorf("%s: `%s`: %s.%s has no method or field %s", f, q, p[1], p[2], p[3])
				}
			case quotedTypeIdent.MatchString(q):
				p := quotedTypeIdent.FindStringSubmatch(q)
				known, found := false, false
				for _, dc := range pkgs {
					if ms, ok := dc.members[p[1]]; ok || dc.top[p[1]] {
						known = true
						found = found || ms[p[2]]
					}
				}
				switch {
				case !known:
					t.Errorf("%s: `%s`: no type %s in internal/", f, q, p[1])
				case !found:
					t.Errorf("%s: `%s`: no type %s in internal/ has %s", f, q, p[1], p[2])
				}
			default:
				checked--
			}
		}
	}
	if checked < 100 {
		t.Errorf("only %d names checked: is the quoting of the pages still understood?", checked)
	}
}

// docs/README.md is where a newcomer who ran ls internal/ looks next:
// every product package and binary has its row.
func TestIndexNamesEveryPackage(t *testing.T) {
	r := root(t)
	index, err := os.ReadFile(filepath.Join(r, "docs", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{"internal", "cmd"} {
		ents, err := os.ReadDir(filepath.Join(r, dir))
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range ents {
			if e.IsDir() && !bytes.Contains(index, []byte("(../"+dir+"/"+e.Name()+"/)")) {
				t.Errorf("docs/README.md has no link to %s/%s/", dir, e.Name())
			}
		}
	}
}
