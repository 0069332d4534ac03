package lifecycle

// Queue carries out a machine's steps one at a time: an event raised while
// a step's actions are carried out (an action that reports at once, as a
// launch does) waits until they are all done, so the actions of one step
// never interleave with a later step's.
type Queue struct {
	pending  []Event
	stepping bool
}

// Feed queues ev and, unless a step is under way, hands each queued event
// to step in order.
func (q *Queue) Feed(ev Event, step func(Event)) {
	q.pending = append(q.pending, ev)
	if q.stepping {
		return
	}
	q.stepping = true
	for len(q.pending) > 0 {
		ev := q.pending[0]
		q.pending = q.pending[1:]
		step(ev)
	}
	q.stepping = false
}
