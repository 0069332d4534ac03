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
