@lifecycle @engines
Feature: Pools on demand
  A pool nobody uses gives its GPUs back: after IdleStopSec= with no lease
  and no request in flight its engine is stopped and the pool is idle, never
  a crash. A lease (with StartOnLease=) or EnsureReady brings it back, the
  callers sharing one start. These scenarios run the engine simulator in
  transient scopes of a real systemd.

  Scenario: An unused pool goes idle without a crash
    Given a ready pool "llama8b" that goes idle after 1 second unused, starting on lease
    When the pool goes idle
    Then the pool state is "idle"
    And the engine process is gone
    And the engine's scope is not active
    And no restart is scheduled
    And no crash is counted
    And the metric pool_managerd_idle_stops_total{pool_id="llama8b"} is 1
    And the metric pool_managerd_pool_state{pool_id="llama8b",state="idle"} is 1

  Scenario: Leases asked of an idle pool share one start
    Given a ready pool "llama8b" that goes idle after 1 second unused, starting on lease
    When the pool goes idle
    And 3 routers ask for a lease at once
    Then every router gets a lease
    And the pool is ready
    And the pool has 3 active leases
    And the engine was started 2 times
    And the metric pool_managerd_lease_starts_total{pool_id="llama8b"} is 1
    And no crash is counted

  Scenario: Without StartOnLease a lease on an idle pool is refused, EnsureReady brings it back
    Given a ready pool "llama8b" that goes idle after 1 second unused
    When the pool goes idle
    And 2 routers ask for a lease at once
    Then every router is refused as not ready
    And the pool state is "idle"
    When EnsureReady is called with a timeout of 30000 ms
    Then EnsureReady succeeds
    And the pool is ready
    And the engine was started 2 times

  Scenario: With Sleep=vllm an unused pool sleeps and a lease wakes the same engine
    Given a ready vLLM pool "vllm8b" that sleeps after 1 second unused, starting on lease
    When the pool falls asleep
    Then the pool state is "sleeping"
    And the engine process is the same as before
    And the simulator says the engine is asleep with no GPU memory held
    And no crash is counted
    And the metric pool_managerd_pool_state{pool_id="vllm8b",state="sleeping"} is 1
    When 2 routers ask for a lease at once
    Then every router gets a lease
    And the pool is ready
    And the engine process is the same as before
    And the engine was started 1 time
    And the metric pool_managerd_wakes_total{pool_id="vllm8b",result="ok"} is 1
    And the metric pool_managerd_wake_duration_seconds{pool_id="vllm8b"} has 1 observation
    And no crash is counted

  Scenario: With Sleep=vllm a wake that fails is replaced by a fresh engine, not counted as a crash
    Given a ready vLLM pool "vllm8b" that sleeps after 1 second unused, starting on lease
    When the pool falls asleep
    And the simulator is given the fault "wake-fail"
    And EnsureReady is called with a timeout of 30000 ms
    Then EnsureReady succeeds
    And the pool is ready
    And a new engine process runs
    And the engine was started 2 times
    And the metric pool_managerd_wakes_total{pool_id="vllm8b",result="failed"} is 1
    And no crash is counted

  Scenario: Group swap with a held lease
    Pools that share a GPU with one Group= take turns: asking for the parked
    one drains the awake one, its lease honoured, then parks it (idle, not a
    crash) and starts the one asked for.
    Given pools "chat" and "code" of group "pair" on GPU 0 with GroupDrainSec=30, started as the daemon starts them
    Then pool "chat" is ready and pool "code" is parked
    Given a router holds a lease on pool "chat"
    When EnsureReady is called for pool "code" in the background
    Then pool "chat" is draining with 1 active lease
    And after 1 second pool "code" is still idle and EnsureReady has not answered
    When the router releases its lease
    Then EnsureReady answers with success within 30 seconds
    And pool "code" is ready
    And pool "chat" is parked without a crash, journaled with reason "group"
    And the metric pool_managerd_group_swaps_total{group="pair"} is 1
    And the metric pool_managerd_group_swap_duration_seconds{group="pair"} has 1 observation

  Scenario: A canary finds an engine that answers its health check but cannot generate
    An engine can keep answering /health while it cannot generate. A
    ready pool unused for CanaryIdleSec= is sent CanaryRequest=; a failed
    canary is a failed health probe, the good probes between canaries
    reset nothing, and FailureThreshold= of them restart the engine.
    Given a ready pool "llama8b" sent the canary "POST /completion" after 1 second unused
    When the pool is left unused until the engine generates
    Then the engine generated 1 token, the canary's, at least 1 second after the pool became ready
    And no crash is counted
    When the simulator is given the fault "fail-completion"
    Then the engine's health check answers ok
    And 3 failed canaries restart the engine as "health_check", good health probes between them resetting nothing
    And a new engine process runs
    And the metric pool_managerd_engine_crashes_total{pool_id="llama8b",reason="health_check"} is 1

  Scenario: A start without the GPU memory it needs waits for it, naming who holds it
    A start whose GPUs lack MemoryRequired= free is refused, naming the
    processes that hold the memory, and is no crash: the pool looks
    again until the memory is free, then starts by itself.
    Given a ready pool "small" whose engine holds 60G of GPU 0's 80G
    And a pool "big" on GPU 0 with MemoryRequired=30G
    When pool "big" is started
    Then the start is refused for want of GPU memory, naming pool "small" as holding 60G
    And the pool is failed and not live, its last error saying why, no crash counted and its failure streak unchanged
    And after 1 second the pool has looked at the memory again without starting an engine or counting a crash
    When pool "small" stops, its engine freeing the memory
    Then the pool starts by itself without a crash
