@lifecycle @engines
Feature: Drain
  OC-POOL-3010, OC-POOL-3031: draining a pool stops new leases at once, lets
  the leases in flight finish, stops the engine gracefully the instant the
  last one is released, and forces the stop at the deadline. These scenarios
  run real engine simulator processes in transient scopes of a real systemd.

  Background:
    Given a ready pool "llama8b" running the engine simulator

  Scenario: Drain request sets draining flag (B-DRAIN-001)
    Given the router holds 1 lease on the pool
    When a drain is requested with a deadline of 30000 ms
    Then the pool is draining
    And the pool state is "draining"

  Scenario: Draining pool refuses new lease allocations (B-DRAIN-002)
    Given the router holds 1 lease on the pool
    When a drain is requested with a deadline of 30000 ms
    Then a new lease is refused because the pool is draining
    And the pool has 1 active lease

  Scenario: Draining pool allows existing leases to complete (B-DRAIN-003)
    Given the router holds 2 leases on the pool
    When a drain is requested with a deadline of 30000 ms
    And the router releases 1 lease
    Then the pool has 1 active lease
    And the drain has not completed
    And the engine still serves requests
    When the router releases 1 lease
    Then the drain completes with outcome "drained"

  Scenario: Drain waits for active_leases to reach 0 (B-DRAIN-004)
    Given the router holds 3 leases on the pool
    When a drain is requested with a deadline of 30000 ms
    And the router releases 2 leases
    Then the drain has not completed
    When the router releases 1 lease
    Then the drain completes with outcome "drained"
    And the pool has 0 active leases
    And the drain completed within 50 ms of the last lease release

  Scenario: Drain force-stops after deadline expires (B-DRAIN-005)
    Given the router holds 1 lease on the pool
    When a drain is requested with a deadline of 500 ms
    Then the drain completes with outcome "forced"
    And the drain took at least 500 ms
    And the pool has 0 active leases
    And releasing the router's lease now is refused as an unknown lease
    And the engine process is gone
    And the metric pool_managerd_drain_force_stops_total{pool_id="llama8b"} is 1

  Scenario: Drain stops engine process after leases drain (B-DRAIN-006)
    Given the router holds 1 lease on the pool
    When a drain is requested with a deadline of 30000 ms
    Then the engine process is still running
    When the router releases 1 lease
    Then the drain completes with outcome "drained"
    And the engine process is gone
    And the engine's scope is not active
    And the runtime record of the pool is removed

  Scenario: Drain updates registry health to not ready (B-DRAIN-007)
    When a drain is requested with a deadline of 30000 ms
    Then the drain completes with outcome "drained"
    And the pool is neither live nor ready
    And the pool state is "stopped"
    And the pool is not draining

  Scenario: Drain with no active leases completes immediately
    When a drain is requested with a deadline of 30000 ms
    Then the drain completes with outcome "drained"
    And the lease phase of the drain took under 50 ms
    And no restart is scheduled

  Scenario: Drain emits metrics for drain duration
    When a drain is requested with a deadline of 30000 ms
    Then the drain completes with outcome "drained"
    And the metric pool_managerd_drain_duration_seconds{pool_id="llama8b",outcome="drained"} has 1 observation
    And the metric pool_managerd_drains_total{pool_id="llama8b",outcome="drained"} is 1

  Scenario: Drain with inflight requests logs warning
    Given the router holds 2 leases on the pool
    When a drain is requested with a deadline of 30000 ms
    Then the journal has a warning for pool "llama8b" with ACTIVE_LEASES 2
