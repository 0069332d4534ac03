@supervision
Feature: Restart backoff
  OC-POOL-3011: restart storms are bounded by exponential backoff.
  A crashed engine restarts after a delay that doubles with each crash in a
  row, is capped, never drops below a minimum, is jittered so pools that
  crash together do not restart together, and starts over once the engine
  has run stably. The clock is simulated: nothing here sleeps.

  Background:
    Given a pool "llama8b" with the default restart policy

  Scenario: First restart has initial_ms delay (B-SUPER-010)
    Given backoff jitter is disabled
    When the engine crashes with exit code 1
    Then a restart is scheduled after 1000 ms
    And the pool state is "backoff"

  Scenario: Subsequent restarts double delay (exponential) (B-SUPER-011)
    Given backoff jitter is disabled
    And the breaker threshold is 100
    When the engine crashes 5 times in a row
    Then the restart delays are 1000, 2000, 4000, 8000, 16000 ms

  Scenario: Backoff delay is capped at max_ms (B-SUPER-012)
    Given backoff jitter is disabled
    And the breaker threshold is 100
    And a pool "jittery" with the default restart policy and 10 percent jitter
    When the engine crashes 10 times in a row
    Then the restart delays are 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000, 60000 ms
    When the engine of "jittery" crashes 60 times in a row
    Then none of the restart delays of "jittery" exceeds 60000 ms
    And at least 40 of the last 50 restart delays of "jittery" are below 60000 ms

  Scenario: Backoff includes jitter to prevent thundering herd (B-SUPER-013)
    Given 500 pools with the default restart policy
    When every one of those engines crashes with exit code 1 at the same moment
    Then every one of their restart delays is between 900 and 1100 ms
    And their restart delays spread over at least 160 ms
    And at least 490 of their restart delays are distinct

  Scenario: Backoff resets after stable run period (B-SUPER-014)
    Given backoff jitter is disabled
    And the engine has crashed 3 times in a row
    When the engine restarts and runs healthy for 299 seconds
    And the engine crashes with exit code 1
    Then a restart is scheduled after 8000 ms
    When the engine restarts and runs healthy for 300 seconds
    Then the journal has a "recovered" entry with fields:
      | POOL_ID | llama8b |
    When the engine crashes with exit code 1
    Then a restart is scheduled after 1000 ms

  Scenario: Backoff policy logs delay decisions
    Given backoff jitter is disabled
    When the engine crashes with exit code 1
    Then the journal has a "restart scheduled" entry with fields:
      | POOL_ID         | llama8b              |
      | BACKOFF_MS      | 1000                 |
      | CRASH_COUNT     | 1                    |
      | CRASH_REASON    | exit_code            |
      | NEXT_RESTART_AT | 2026-01-01T00:00:01Z |
      | RESTART_COUNT   | 0                    |
    When the engine restarts and crashes with a CUDA error
    Then the journal has a "restart scheduled" entry with fields:
      | POOL_ID         | llama8b              |
      | BACKOFF_MS      | 4000                 |
      | CRASH_COUNT     | 2                    |
      | CRASH_REASON    | cuda_error           |
      | NEXT_RESTART_AT | 2026-01-01T00:00:05Z |
      | RESTART_COUNT   | 1                    |

  Scenario: Backoff respects minimum delay
    Given the backoff initial delay is 100 ms and the minimum delay is 500 ms
    And backoff jitter is disabled
    When the engine crashes 4 times in a row
    Then the restart delays are 500, 500, 500, 800 ms
    When 200 pools with this policy and 10 percent jitter crash at the same moment
    Then every one of their restart delays is between 500 and 550 ms
    And at least 190 of their restart delays are distinct

  Scenario: Backoff delay increases per crash type
    Given a pool "vllm70b" with the default restart policy
    And backoff jitter is disabled
    When the engine of "llama8b" crashes with exit code 1
    And the engine of "vllm70b" crashes with a CUDA error
    Then the restart of "llama8b" is scheduled after 1000 ms
    And the restart of "vllm70b" is scheduled after 2000 ms
    When the engine of "vllm70b" restarts and crashes with a CUDA error
    Then the restart of "vllm70b" is scheduled after 4000 ms

  Scenario: Backoff emits metrics
    Given backoff jitter is disabled
    When the engine crashes 3 times in a row
    Then the metric pool_managerd_backoff_delay_seconds{pool_id="llama8b",crash_reason="exit_code"} has 3 observations summing to 7
    And the metric pool_managerd_restarts_scheduled_total{pool_id="llama8b",crash_reason="exit_code"} is 3
    And the metric pool_managerd_engine_crashes_total{pool_id="llama8b",reason="exit_code"} is 3
