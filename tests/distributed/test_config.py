"""Fast checks of how `elm train` decides to join a multi-process job (no processes started)."""
from efficient_lm import _compat, sharding
from efficient_lm.cli import _distributed_config, parser


def test_env_and_flags():
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "2", "JAX_LOCAL_DEVICE_IDS": "0,1"}
  cfg = sharding.distributed_from_env(env)
  assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id, cfg.local_device_ids) == (
      "10.0.0.1:1234", 4, 2, (0, 1))
  assert sharding.distributed_from_env({}) == sharding.DistributedConfig()
  args = parser().parse_args(["train", "--coordinator-address", "h:1", "--num-processes", "2",
                              "--process-id", "1", "--local-device-ids", "3"])
  cfg = _distributed_config(args)
  assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id, cfg.local_device_ids) == (
      "h:1", 2, 1, (3,))


def test_single_process_is_left_alone(monkeypatch):
  for k in ("JAX_COORDINATOR_ADDRESS", "ELM_COORDINATOR_ADDRESS", "ELM_DISTRIBUTED",
            "SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(k, raising=False)
  if _compat.detected_cluster() is None:
    assert sharding.maybe_initialize_distributed() is False
  assert sharding.maybe_initialize_distributed(
      sharding.DistributedConfig(coordinator_address="localhost:1", num_processes=1)) is False


def test_compat_distributed_initialize_rejects_unknown_option():
  import pytest
  with pytest.raises(TypeError, match="no 'not_an_option' option"):
    _compat.distributed_initialize(not_an_option=1)
