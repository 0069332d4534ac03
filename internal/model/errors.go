package model

import (
	"errors"
	"fmt"
	"regexp"
)

// ErrDigestMismatch is wrapped by the RefError Stage returns when the file's
// digest differs from the one asked for.
var ErrDigestMismatch = errors.New("digest mismatch")

// RefError is a model ref that cannot be used, and exactly why. The daemon
// maps it to InvalidArgument: the ref (or the file it names) is at fault, not
// the daemon.
type RefError struct {
	Ref    string // the ref as given
	Path   string // the file the ref resolved to, when known and different from Ref
	Reason string // what is wrong, e.g. "does not exist"
	Err    error  // the underlying cause, if any
}

func (e *RefError) Error() string {
	if e.Path != "" && e.Path != e.Ref {
		return fmt.Sprintf("model %q (%s): %s", e.Ref, e.Path, e.Reason)
	}
	return fmt.Sprintf("model %q: %s", e.Ref, e.Reason)
}

func (e *RefError) Unwrap() error { return e.Err }

func refErr(ref, path string, err error, format string, args ...any) *RefError {
	return &RefError{Ref: ref, Path: path, Reason: fmt.Sprintf(format, args...), Err: err}
}

var digestRE = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)

// ValidDigest reports whether d is "sha256:" followed by 64 lower-case hex
// digits, the only form pool-managerd writes or accepts.
func ValidDigest(d string) bool { return digestRE.MatchString(d) }
