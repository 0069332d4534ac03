@supervision @engines
Feature: Crash detection
  OC-POOL-3010: an engine that dies, stops answering its health check, or hits
  a driver/CUDA error makes its pool unready, and the pool is restarted under
  the backoff policy. These scenarios run real engine simulator processes in
  transient scopes of a real systemd.

  Background:
    Given a pool "llama8b" running the engine simulator on GPU 0
    And the pool is ready

  Scenario: Supervisor detects when engine process exits (B-SUPER-001)
    When the engine exits with status 3
    Then the supervisor detects a crash with reason "exit_code"
    And the pool's last error says "exited with status 3"
    And the pool is ready again on a new engine process

  Scenario: Supervisor detects when health check fails (B-SUPER-002)
    When the engine stops answering its health check
    Then the supervisor detects a crash with reason "health_check"
    And 3 failed health probes were recorded, each with its time
    And the pool's last error says "health check failed 3 times"
    And the pool is ready again on a new engine process

  Scenario: Supervisor detects driver/CUDA errors (B-SUPER-003)
    When the engine hits a CUDA error
    Then the supervisor detects a crash with reason "cuda_error"
    And the pool's last error says "CUDA error: an illegal memory access was encountered"
    And the journal of the engine's scope shows "CUDA error: an illegal memory access was encountered"
    And the pool is ready again on a new engine process

  Scenario: Supervisor transitions pool to unready on crash (B-SUPER-004)
    When the engine process is killed with SIGKILL from outside
    Then the pool is neither live nor ready
    And the pool state is "backoff"
    And the pool is ready again on a new engine process

  Scenario: Supervisor captures exit signals
    When the engine dies of a segmentation fault
    Then the supervisor detects a crash with reason "signal"
    And the pool's last error says "killed by SIGSEGV"
    And the crash entry in the journal has EXIT_SIGNAL "SIGSEGV"

  Scenario: Supervisor distinguishes graceful vs crash exit
    When the engine exits with status 0
    Then the pool state becomes "stopped"
    And the crash count is 0
    And no restart is scheduled
    And the journal says "engine exited on its own with status 0: not restarted"
    When the pool is started again
    And the engine exits with status 1
    Then the supervisor detects a crash with reason "exit_code"
    And the crash count is 1

  Scenario: Supervisor logs crash context
    When the engine runs for 1 second and exits with status 3
    Then the supervisor detects a crash with reason "exit_code"
    And the crash entry in the journal has fields:
      | POOL_ID        | llama8b   |
      | MESSAGE_ID     | crash     |
      | CRASH_REASON   | exit_code |
      | EXIT_CODE      | 3         |
      | ENGINE_VERSION | sim-1     |
      | DEVICE_MASK    | 0         |
      | CRASH_COUNT    | 1         |
      | RESTART_COUNT  | 0         |
    And the crash entry's UPTIME_SEC is at least 1
    And the crash entry names the model

  Scenario: Supervisor increments crash counter
    When the engine exits with status 1
    And the pool is ready again on a new engine process
    And the engine exits with status 1
    And the pool is ready again on a new engine process
    Then the crash count is 2
    And the metric pool_managerd_engine_crashes_total{pool_id="llama8b",reason="exit_code"} is 2

  Scenario: Supervisor detects OOM kills
    Given a pool "big" running the engine simulator on GPU 1 with MemoryMax=64M
    And pool "big" is ready
    When the engine of "big" allocates memory until it is killed
    Then the supervisor detects a crash of "big" with reason "out_of_memory"
    And the journal has a critical (PRIORITY=2) "OOM" entry for pool "big"
    And the pool "big" is ready again on a new engine process
