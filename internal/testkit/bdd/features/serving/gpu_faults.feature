@serving @engines
Feature: GPU faults and leftover processes
  An XID from NVML is handled as NVIDIA's XID catalog says: an application
  restart clears some, some are nothing to act on, and some mean the GPU needs
  a reset or is lost, when no restart loop may run against it. An engine
  starts only on GPUs no other process holds.

  Scenario: A device-level XID a restart clears restarts only the pool on that GPU
    Given a pool "a" running the engine simulator on GPU 0
    And a pool "b" running the engine simulator on GPU 1
    And pool "a" is ready
    And pool "b" is ready
    When NVML reports XID 94 on GPU 0
    Then the supervisor detects a crash of "a" with reason "driver_xid"
    And the pool "a" is ready again on a new engine process
    And pool "b" stays ready on the same engine process for 1 second

  Scenario: An XID that needs a GPU reset on one GPU of a two-GPU pool holds that pool
    Given a pool "wide" running the engine simulator on GPUs 0 and 1
    And pool "wide" is ready
    When NVML reports XID 48 on GPU 1
    Then pool "wide" is held failed with the last error "needs a reset: Xid 48"
    And the crash count of "wide" is 1
    And pool "wide" is not restarted for 1 second
    When NVML reports GPU 1 usable again
    Then the pool "wide" is ready again on a new engine process

  Scenario: An XID the catalog says to ignore changes nothing
    Given a pool "a" running the engine simulator on GPU 0
    And pool "a" is ready
    When NVML reports XID 43 on GPU 0
    Then pool "a" stays ready on the same engine process for 1 second

  Scenario: Another process on the pool's GPU holds its start, with no crash
    Given a process outside any pool holds GPU 0's device node
    When a pool "a" is started on GPU 0
    Then pool "a" is held failed with the last error naming the holder's PID
    And the crash count of "a" is 0
    When the process holding GPU 0 exits
    Then pool "a" is ready
