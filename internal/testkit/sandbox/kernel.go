package sandbox

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// KernelPrints has the kernel itself print msg (a packet log whose prefix
// is msg, for a datagram sent here): the one way a test can make the
// kernel write a message of its own facility that begins with the text it
// chooses. The table is removed when the test ends.
func KernelPrints(t *testing.T, msg string) {
	t.Helper()
	nft, err := exec.LookPath("nft")
	if err != nil {
		t.Fatalf("nft is missing: install Debian's nftables package (apt-get install --no-install-recommends nftables; make test does, as root)")
	}
	if len(msg) >= 128 {
		t.Fatalf("nft's log prefix takes under 128 bytes, not %d", len(msg))
	}
	l, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	port := l.LocalAddr().(*net.UDPAddr).Port
	table := fmt.Sprintf("pool_managerd_test_%d_%d", os.Getpid(), port)
	cmd := exec.Command(nft, "-f", "-")
	cmd.Stdin = strings.NewReader(fmt.Sprintf("table inet %s {\n chain out {\n  type filter hook output priority 0; policy accept;\n"+
		"  ip daddr 127.0.0.1 udp dport %d log prefix \"%s\" level warn\n }\n}\n", table, port, msg))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command(nft, "delete", "table", "inet", table).Run() })
	c, err := net.Dial("udp", l.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("xid")); err != nil {
		t.Fatal(err)
	}
}
