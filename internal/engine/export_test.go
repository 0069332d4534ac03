package engine

// Private says whether the runtime talks to systemd on its private socket.
func (r *Runtime) Private() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.private && r.conn != nil && r.conn.Connected()
}
