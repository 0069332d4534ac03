// Package suite runs feature files with godog from go test, strictly: an
// undefined or pending step fails, and so does a feature set that does not
// hold the expected number of scenarios.
package suite

import (
	"testing"

	"github.com/cucumber/godog"
)

// Run runs the scenarios of the feature files at paths.
func Run(t *testing.T, name string, want int, init func(*godog.ScenarioContext), paths ...string) {
	t.Helper()
	s := godog.TestSuite{
		Name:                name,
		ScenarioInitializer: init,
		Options: &godog.Options{
			Format:   "progress",
			Paths:    paths,
			Strict:   true,
			TestingT: t,
		},
	}
	features, err := s.RetrieveFeatures()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, f := range features {
		for _, c := range f.GherkinDocument.Feature.Children {
			if c.Scenario != nil {
				n++
			}
		}
	}
	if n != want {
		t.Fatalf("%s: the features hold %d scenarios, want %d", name, n, want)
	}
	if st := s.Run(); st != 0 {
		t.Fatalf("%s: godog exited with status %d", name, st)
	}
}
