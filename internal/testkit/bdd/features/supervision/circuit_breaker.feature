@supervision
Feature: Circuit breaker
  OC-POOL-3011: restart storms are bounded by a circuit breaker.
  After too many failures in a row the breaker opens and holds restarts; after
  its open time it lets exactly one test restart through; it closes once that
  engine has run healthy long enough, and reopens for twice as long if the test
  fails. A pool has a breaker per crash class and a general one. The clock is
  simulated: nothing here sleeps.

  Background:
    Given a pool "llama8b" with the default restart policy
    And backoff jitter is disabled

  Scenario: Circuit opens after N consecutive failures (B-SUPER-020)
    When the engine crashes 4 times in a row
    Then the circuit breaker is "closed"
    When the engine restarts and crashes with exit code 1
    Then the circuit breaker is "open"
    And the "process" breaker has 5 consecutive failures
    And the pool state is "failed"

  Scenario: Open circuit prevents restart attempts (B-SUPER-021)
    Given the engine has crashed 5 times in a row
    Then no restart is scheduled
    When 299 seconds pass
    Then a restart attempt is refused because "circuit breaker open"
    And the restart count is 4
    And the pool state is "failed"

  Scenario: Circuit transitions to half-open after timeout (B-SUPER-022)
    Given the circuit breaker has opened
    When 299 seconds pass
    Then the circuit breaker is "open"
    When 1 second passes
    Then the circuit breaker is "half-open"

  Scenario: Half-open allows single test restart (B-SUPER-023)
    Given the circuit breaker is half-open
    When a restart is attempted
    Then the restart is allowed as a test restart
    When another restart is attempted
    Then the attempt is refused because "circuit breaker test restart in progress"
    And the restart count is 5

  Scenario: Circuit closes after successful test restart (B-SUPER-024)
    Given the circuit breaker is half-open
    When the engine restarts and runs healthy for 59 seconds
    Then the circuit breaker is "half-open"
    When 1 second passes
    Then the circuit breaker is "closed"
    And the "process" breaker has 0 consecutive failures
    When the engine crashes with exit code 1
    Then a restart is scheduled

  Scenario: Circuit reopens if test restart fails (B-SUPER-025)
    Given the circuit breaker is half-open
    When the engine restarts and crashes with exit code 1
    Then the circuit breaker is "open"
    When 599 seconds pass
    Then the circuit breaker is "open"
    When 1 second passes
    Then the circuit breaker is "half-open"
    When the engine restarts and crashes with exit code 1
    Then the circuit breaker stays open for 1200 seconds
    When the test restart fails 5 more times
    Then the circuit breaker stays open for 3600 seconds

  Scenario: Circuit breaker logs state transitions
    When the engine crashes 5 times in a row
    Then the journal has a "breaker changed" entry with fields:
      | POOL_ID         | llama8b              |
      | BREAKER_CLASS   | process              |
      | OLD_STATE       | closed               |
      | NEW_STATE       | open                 |
      | FAILURE_COUNT   | 5                    |
      | NEXT_RESTART_AT | 2026-01-01T00:05:15Z |
    When 300 seconds pass
    Then the journal has a "breaker changed" entry with fields:
      | POOL_ID       | llama8b   |
      | BREAKER_CLASS | process   |
      | OLD_STATE     | open      |
      | NEW_STATE     | half-open |

  Scenario: Circuit breaker emits metrics
    When the engine crashes 5 times in a row
    Then the metric pool_managerd_circuit_breaker_state{pool_id="llama8b",class="process"} is 1
    And the metric pool_managerd_circuit_breaker_state{pool_id="llama8b",class="general"} is 0
    And the metric pool_managerd_circuit_breaker_opens_total{pool_id="llama8b",class="process"} is 1
    When 300 seconds pass
    Then the metric pool_managerd_circuit_breaker_state{pool_id="llama8b",class="process"} is 2
    When the engine restarts and runs healthy for 60 seconds
    Then the metric pool_managerd_circuit_breaker_state{pool_id="llama8b",class="process"} is 0

  Scenario: Circuit breaker respects manual reset
    Given the circuit breaker has opened
    When the operator resets the circuit breaker
    Then the circuit breaker is "closed"
    And the "process" breaker has 0 consecutive failures
    And the crash count is 5
    When a restart is attempted
    Then the restart is allowed
    When the engine crashes with exit code 1
    Then a restart is scheduled after 1000 ms

  Scenario: Circuit breaker failure threshold is configurable
    Given the breaker threshold is 3
    When the engine crashes 2 times in a row
    Then the circuit breaker is "closed"
    When the engine restarts and crashes with exit code 1
    Then the circuit breaker is "open"
    And the "process" breaker has 3 consecutive failures

  Scenario: Circuit breaker distinguishes error types
    Given a pool "mixed" with the default restart policy
    When the engine of "llama8b" crashes with a CUDA error 5 times in a row
    Then the "cuda" breaker of "llama8b" is "open"
    And the "general" breaker of "llama8b" is "closed"
    And the "process" breaker of "llama8b" is "closed"
    When the engine of "mixed" crashes in a row with cuda_error, exit_code, cuda_error, out_of_memory, signal
    Then the "general" breaker of "mixed" is "open"
    And the "cuda" breaker of "mixed" is "closed"
    And the "process" breaker of "mixed" is "closed"
    And the "oom" breaker of "mixed" is "closed"
