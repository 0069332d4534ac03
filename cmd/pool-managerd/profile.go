package main

// profile starts what a measurement asked the daemon to record; what it
// returns ends and writes it. Release builds record nothing: the
// recording is in builds with the pprof tag only (profile_pprof.go).
var profile = func() (stop func()) { return func() {} }
