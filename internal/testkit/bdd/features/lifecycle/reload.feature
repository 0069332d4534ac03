@lifecycle @engines
Feature: Reload
  OC-POOL-3038: reloading a pool swaps its model atomically: drain, stage the
  new model, stop the old engine, start the new one and wait for its health;
  if the new engine fails, kill it and bring the old model back. These
  scenarios run real engine simulator processes in transient scopes of a real
  systemd; a model without the GGUF magic makes the simulator exit like
  llama.cpp does, and a model that asks the simulator for hang-health fails
  its health check.

  Background:
    Given a ready pool "llama8b" running the engine simulator on model "model-a.gguf"
    And a model "model-b.gguf" is available

  Scenario: Reload drains pool first (B-RELOAD-001)
    Given the router holds 1 lease on the pool
    When the pool is reloaded to "model-b.gguf" in the background
    Then the pool is draining
    And the engine process is still running
    When the router releases 1 lease
    Then the reload succeeds with model "model-b.gguf"

  Scenario: Reload stages new model via model-provisioner (B-RELOAD-002)
    When the pool is reloaded to "model-b.gguf"
    Then the reload succeeds with model "model-b.gguf"
    And the engine loaded a staged copy of "model-b.gguf" named by its digest
    And the pool's model digest is the sha256 of "model-b.gguf"

  Scenario: Reload stops old engine process (B-RELOAD-003)
    When the pool is reloaded to "model-b.gguf"
    Then the reload succeeds with model "model-b.gguf"
    And the old engine process is gone

  Scenario: Reload starts new engine with new model (B-RELOAD-004)
    When the pool is reloaded to "model-b.gguf"
    Then the reload succeeds with model "model-b.gguf"
    And a new engine process runs
    And the engine serves "model-b.gguf"

  Scenario: Reload waits for new engine health check (B-RELOAD-005)
    Given model "model-b.gguf" takes 1 second to load
    When the pool is reloaded to "model-b.gguf"
    Then the reload succeeds with model "model-b.gguf"
    And the reload took at least 1 second
    And the engine's health check answers ok

  Scenario: Reload sets ready=true on success (B-RELOAD-006)
    When the pool is reloaded to "model-b.gguf"
    Then the reload succeeds with model "model-b.gguf"
    And the pool is ready
    And the pool state is "ready"
    And the pool is not draining

  Scenario: Reload rolls back on failure (atomic) (B-RELOAD-007)
    Given a file "not-a-model.bin" that is not a GGUF model
    When the pool is reloaded to "not-a-model.bin"
    Then the reload fails saying it rolled back
    And the failed engine process is gone
    And the engine serves "model-a.gguf"
    And the pool is ready

  Scenario: Reload updates engine_version in registry (B-RELOAD-008)
    Given the engine binary is upgraded to version "b5000"
    When the pool is reloaded to "model-b.gguf"
    Then the reload succeeds with model "model-b.gguf"
    And the pool's engine version is "b5000"
    And the runtime record says engine_version "b5000" and model "model-b.gguf"

  Scenario: Reload preserves pool_id and device_mask (B-RELOAD-009)
    When the pool is reloaded to "model-b.gguf"
    Then the reload succeeds with model "model-b.gguf"
    And the pool id is "llama8b"
    And the pool's device mask is "0"
    And the engine's CUDA_VISIBLE_DEVICES is GPU 0's UUID

  Scenario: Reload with same model version is idempotent
    When the pool is reloaded to "model-a.gguf"
    Then the reload succeeds with model "model-a.gguf"
    And the engine process is the same as before
    And the engine was started 1 time

  Scenario: Reload failure preserves original state
    Given a model "hangs.gguf" that makes the engine stop answering its health check
    When the pool is reloaded to "hangs.gguf"
    Then the reload fails saying it rolled back
    And the pool's model is "model-a.gguf"
    And the pool's model digest is the sha256 of "model-a.gguf"
    And the pool's device mask is "0"
    And the pool is ready
    And the runtime record says engine_version "sim-1" and model "model-a.gguf"

  Scenario: Reload emits metrics for reload duration
    When the pool is reloaded to "model-b.gguf"
    Then the reload succeeds with model "model-b.gguf"
    And the metric pool_managerd_reload_duration_seconds{pool_id="llama8b",outcome="success"} has 1 observation
    And the metric pool_managerd_reload_success_total{pool_id="llama8b"} is 1

  Scenario: Reload failure emits failure metrics
    Given a file "not-a-model.bin" that is not a GGUF model
    When the pool is reloaded to "not-a-model.bin"
    Then the reload fails saying it rolled back
    And the metric pool_managerd_reload_failure_total{pool_id="llama8b",reason="crash"} is 1
    And the metric pool_managerd_reload_duration_seconds{pool_id="llama8b",outcome="failure"} has 1 observation

  Scenario: Reload with drain timeout fails gracefully
    Given the router holds 1 lease on the pool
    When the pool is reloaded to "model-b.gguf" with a drain deadline of 300 ms
    Then the reload fails with a drain timeout
    And the pool is ready
    And the engine process is the same as before
    And the pool has 1 active lease
    And the engine serves "model-a.gguf"
