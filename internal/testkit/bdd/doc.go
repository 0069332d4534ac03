// Package bdd runs the seed's behaviour scenarios (features/) against the
// real packages with godog, from go test, in strict mode.
package bdd
