@serving @engines
Feature: Serving health
  A live engine with a 200 /health is not necessarily serving: it can be stuck
  mid-generation, or not yet able to answer a real request. pool-managerd reads
  the engine's own metrics (requests in flight, tokens produced) and sends a
  warm-up request before a pool is Ready. These scenarios run real engine
  simulator processes in transient scopes of a real systemd.

  Scenario: A stalled engine is restarted as stalled
    Given a pool "chat" running the engine simulator on GPU 0 with stall detection after 1 second
    And the pool is ready
    When the engine stalls with a request in flight
    Then the supervisor detects a crash with reason "stalled" within 2 seconds of the stall
    And the pool's last error says "no token for"
    And the crash entry in the journal has fields:
      | POOL_ID      | chat    |
      | CRASH_REASON | stalled |
    And the pool is ready again on a new engine process

  Scenario: A busy engine whose tokens keep coming is never restarted
    Given a pool "chat" running the engine simulator on GPU 0 with stall detection after 1 second
    And the pool is ready
    When the engine is busy, slow but producing tokens
    Then the pool stays ready on the same engine process for 3 seconds

  Scenario: An engine whose metrics stop answering mid-generation is restarted as stalled
    Given a pool "chat" running the engine simulator on GPU 0 with stall detection after 1 second
    And the pool is ready
    When the engine is busy, slow but producing tokens
    And the pool has read the engine's metrics for a second
    And the engine's metrics endpoint stops answering in time
    Then the supervisor detects a crash with reason "stalled" within 3 seconds of the stall
    And the pool's last error says "its metrics endpoint stopped answering"

  Scenario: An engine without usable metrics is never restarted for it
    Given a pool "chat" running the engine simulator on GPU 0 with stall detection after 1 second
    And the pool is ready
    When the engine's metrics endpoint stops answering
    Then the pool stays ready on the same engine process for 3 seconds
    And the journal says "engine's metrics endpoint unusable: no stall detection until it answers"

  Scenario: The warm-up request gates Ready
    Given a pool "chat" running the engine simulator on GPU 0 with a warm-up request taking 1 second
    Then the pool is "warming" before it is ready
    And the engine answered the warm-up request before the pool was ready

  Scenario: A failed warm-up is a start failure
    Given a pool "chat" running the engine simulator on GPU 0 with a warm-up request the engine refuses
    Then the supervisor detects a crash with reason "start_failure"
    And the pool's last error says "warm-up request failed"
    And the pool has never been ready
