package journal

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"path/filepath"
	"strings"
	"testing"
)

// Every log line has a fixed message and the error in a field (ERROR): a
// message built from an error cannot be searched for, counted or matched
// by a catalog entry. This reads the product's code (cmd/ and internal/)
// and names each logging call whose message is made from an error.
func TestLogMessagesCarryNoError(t *testing.T) {
	var bad []string
	for _, top := range []string{"../../cmd", "../../internal"} {
		err := filepath.WalkDir(top, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.IsDir() && (d.Name() == "testkit" || d.Name() == "testdata") {
				return filepath.SkipDir
			}
			if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
				return nil
			}
			fset := token.NewFileSet()
			f, err := parser.ParseFile(fset, path, nil, 0)
			if err != nil {
				return err
			}
			ast.Inspect(f, func(n ast.Node) bool {
				call, ok := n.(*ast.CallExpr)
				if !ok {
					return true
				}
				if msg := logMessage(call); msg != nil && fromError(msg) {
					bad = append(bad, fset.Position(call.Pos()).String())
				}
				return true
			})
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if len(bad) > 0 {
		t.Errorf("log messages made from an error (give the error as journal.Error instead):\n%s", strings.Join(bad, "\n"))
	}
}

// logMessage is the message argument of a logging call: slog's Debug,
// Info, Warn and Error (the first argument), Log and LogAttrs (the third),
// and the lifecycle machine's log(level, msg, ...) (the second).
func logMessage(call *ast.CallExpr) ast.Expr {
	sel, ok := call.Fun.(*ast.SelectorExpr)
	if !ok {
		return nil
	}
	at := -1
	switch sel.Sel.Name {
	case "Debug", "Info", "Warn", "Error":
		at = 0
	case "Log", "LogAttrs":
		at = 2
	case "log":
		at = 1
	}
	if at < 0 || len(call.Args) <= at {
		return nil
	}
	// Error(...) of another kind (an errors' method, testing.T's) has no
	// string message to look at; only strings built in place are.
	switch m := call.Args[at].(type) {
	case *ast.BasicLit, *ast.BinaryExpr, *ast.CallExpr:
		return m
	}
	return nil
}

// fromError says whether e mentions an error: a call of a method Error, or
// a variable named like one (err, fooErr).
func fromError(e ast.Expr) bool {
	found := false
	ast.Inspect(e, func(n ast.Node) bool {
		switch x := n.(type) {
		case *ast.SelectorExpr:
			if x.Sel.Name == "Error" || x.Sel.Name == "Err" {
				found = true
			}
		case *ast.Ident:
			if x.Name == "err" || strings.HasSuffix(x.Name, "Err") {
				found = true
			}
		}
		return !found
	})
	return found
}
