@supervision
Feature: Restart storm
  OC-POOL-3011: a pool restarts at most StormMaxRestarts times in any
  StormWindowSec (10 in 60 s). Past half of that it warns; at the limit it holds
  the restart, raises a critical journal alert naming the kind of storm and
  what to do, and opens the circuit breaker. Restarts here are fast (a fixed
  500 ms backoff) and the breaker's own threshold high, so the storm limit is
  what stops them. The clock is simulated: nothing here sleeps.

  Background:
    Given a pool "llama8b" with the default restart policy
    And the backoff is fixed at 500 ms
    And the breaker threshold is 100

  Scenario: Restart counter increments on each restart (B-SUPER-030)
    When the engine crashes and restarts 3 times
    Then the restart count is 3
    And the journal has a "restarting" entry with fields:
      | POOL_ID       | llama8b |
      | RESTART_COUNT | 3       |

  Scenario: Restart counter resets after stable period (B-SUPER-031)
    Given the engine has crashed and restarted 3 times
    When the engine runs healthy for 599 seconds
    Then the restart count is 3
    When 1 second passes
    Then the restart count is 0
    And the crash count is 3

  Scenario: Restart storms are logged with restart_count (B-SUPER-032)
    When the engine crashes and restarts 5 times
    Then the journal has no "storm warning" entry
    When the engine crashes and restarts 1 time
    Then the journal has a "storm warning" entry with fields:
      | POOL_ID            | llama8b |
      | RESTART_COUNT      | 5       |
      | RESTARTS_IN_WINDOW | 6       |
      | TIME_WINDOW_SEC    | 60      |

  Scenario: Maximum restart rate is enforced (B-SUPER-033)
    When the engine crashes and restarts 10 times
    And the engine crashes with exit code 1
    Then no restart is scheduled
    And the next restart is not before 60 seconds after the first restart
    And a restart attempt is refused
    And the restart count is 10

  Scenario: Restart rate limit uses sliding window
    When the engine crashes and restarts 10 times, running 4.5 seconds each time
    And the clock reaches 62 seconds
    Then the restart rate is 9
    When the engine crashes with exit code 1
    Then a restart is scheduled
    When the engine restarts and crashes with exit code 1
    Then no restart is scheduled
    And the restart rate is 10

  Scenario: Restart storm triggers circuit breaker
    When the engine crashes and restarts 10 times
    And the engine crashes with exit code 1
    Then the circuit breaker is "open"
    And the "process" breaker has 11 consecutive failures
    And the pool state is "failed"
    And the metric pool_managerd_circuit_breaker_opens_total{pool_id="llama8b",class="process"} is 1

  Scenario: Restart storm emits critical alert
    When the engine crashes and restarts 10 times
    And the engine crashes with exit code 1
    Then the journal has a "restart storm" entry at level critical (PRIORITY=2) with fields:
      | POOL_ID            | llama8b       |
      | STORM_KIND         | process_storm |
      | RESTART_COUNT      | 10            |
      | RESTARTS_IN_WINDOW | 10            |
      | TIME_WINDOW_SEC    | 60            |
    And the "restart storm" entry's HINT mentions "journalctl -u pool-engine-<id>.scope"

  Scenario: Restart storm metrics are tracked
    When the engine crashes and restarts 10 times
    Then the metric pool_managerd_restart_rate{pool_id="llama8b"} is 10
    When the engine crashes with exit code 1
    Then the metric pool_managerd_restart_storms_total{pool_id="llama8b",kind="process_storm"} is 1
    When 61 seconds pass
    Then the metric pool_managerd_restart_rate{pool_id="llama8b"} is 0

  Scenario: Restart storm distinguishes crash types
    Given a pool "oom" with the default restart policy
    And a pool "gpu" with the default restart policy
    And a pool "mixed" with the default restart policy
    When the engine of "oom" crash-loops with out_of_memory until a restart storm
    And the engine of "gpu" crash-loops with cuda_error until a restart storm
    And the engine of "mixed" crash-loops with out_of_memory, cuda_error, exit_code until a restart storm
    Then the restart storm of "oom" is "oom_storm" with a hint that mentions "MemoryMax="
    And the restart storm of "gpu" is "cuda_storm" with a hint that mentions "Xid"
    And the restart storm of "mixed" is "mixed_storm" with a hint that mentions "several ways"
    And the "oom" breaker of "oom" is "open"
    And the "cuda" breaker of "gpu" is "open"
    And the "general" breaker of "mixed" is "open"

  Scenario: Restart storm respects manual override
    When the engine crashes and restarts 10 times
    And the engine crashes with exit code 1
    Then no restart is scheduled
    When the operator allows a restart
    And a restart is attempted
    Then the restart is allowed as an override
    And the restart count is 11
    And the restart rate is 11
    And the crash count is 11
    And the circuit breaker is "open"
    When the engine crashes with exit code 1
    Then no restart is scheduled
    And a restart attempt is refused
