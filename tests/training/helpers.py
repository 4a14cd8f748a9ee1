"""Shared pieces of the training tests: a small, fast run config on real models."""
import dataclasses

from efficient_lm.data.pipeline import DataConfig
from efficient_lm.training.config import RunConfig, TrainConfig
from efficient_lm.training.optim import OptimConfig


def small_run(**train_kw) -> RunConfig:
  """deltanet-tiny on MQAR (vocab 64, T=32): a few hundred ms per step on a 2-core CPU."""
  train = dict(steps=12, batch_size=8, log_every=1, eval_every=0, eval_batches=2,
               checkpoint_every=0, tensorboard=False, progress="off", async_checkpoint=False)
  train.update(train_kw)
  return RunConfig(
      model="deltanet-tiny",
      model_overrides={"d_model": 32, "n_heads": 2, "chunk_size": 16},
      data=DataConfig(source="mqar", seq_len=32, mqar_vocab_size=64, mqar_num_kv_pairs=4,
                      mqar_eval_examples=64, num_threads=0),
      optim=OptimConfig(lr=3e-3, warmup_steps=3),
      train=TrainConfig(**train))


def with_train(cfg: RunConfig, **kw) -> RunConfig:
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **kw))
