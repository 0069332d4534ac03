// Package install holds the tests of pool-managerd's packages as an
// operator meets them: installed with dpkg into a fresh system, then
// removed and purged.
package install
