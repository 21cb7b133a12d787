"""The trainer end to end on the tiny MoT config and the embedded data: run directory, learning, resume."""

import functools
import json
import os
import signal

import flax.linen as nn
import jax
import numpy as np
import pytest

from moma import checkpoint
from moma import faults
from moma import flops
from moma import metrics
from moma import steps
from moma import train
from moma.models import decoder

pytestmark = pytest.mark.usefixtures("compilation_cache")


def _losses(workdir):
  return [(r["step"], r["loss"]) for r in metrics.read(workdir) if "loss" in r]


def test_one_step_writes_the_run_directory(tiny_config, tmp_path):
  tiny_config.train.update(steps=1, peak_flops=2e11)
  final = train.train_and_evaluate(tiny_config, str(tmp_path))
  assert final["step"] == 1 and np.isfinite(final["loss"]) and np.isfinite(final["eval/loss"])
  with open(tmp_path / "config.json") as f:
    saved = json.load(f)
  assert saved["model"]["vocab_size"] > 0  # Filled in from the data.
  (row, eval_row) = metrics.read(str(tmp_path))
  assert row["step"] == 1
  for key in ("loss", "loss/text", "loss/image", "tokens_per_s", "flops_per_token", "grad_norm", "lr"):
    assert np.isfinite(row[key]), key
  assert "eval/loss/text" in eval_row
  # MFU: the analytic training FLOPs at the measured throughput over the given peak of the one device.
  analytic = flops.per_token(saved["model"], tiny_config.train.seq_len)["total"]
  assert row["flops_per_token"] == pytest.approx(analytic)
  assert row["perf/mfu"] == pytest.approx(row["tokens_per_s"] * analytic / 2e11)
  assert os.listdir(tmp_path / "checkpoints") == ["1"]
  assert metrics.tensorboard_steps(str(tmp_path))["perf/mfu"] == [1]
  with open(tmp_path / "loss.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert not os.path.exists(tmp_path / "lock")  # Released at the end.


def test_peak_flops_come_from_the_config_or_the_data_sheet():
  fake = lambda kind: type("Device", (), {"device_kind": kind})()
  assert metrics.peak_flops_per_device(0.0, fake("TPU v5 lite")) == 197e12  # v5e, not v5p's "TPU v5"
  assert metrics.peak_flops_per_device(0.0, fake("TPU v5")) == 459e12
  assert metrics.peak_flops_per_device(0.0, fake("NVIDIA H100 80GB HBM3")) == 989e12
  assert metrics.peak_flops_per_device(3e9, fake("NVIDIA H100 80GB HBM3")) == 3e9
  assert metrics.peak_flops_per_device(0.0, jax.devices("cpu")[0]) is None  # No MFU row rather than a made-up one.


def test_loss_falls(tiny_config, tmp_path):
  tiny_config.train.update(steps=60, log_every=10, eval_every=0)
  train.train_and_evaluate(tiny_config, str(tmp_path))
  losses = [loss for _, loss in _losses(str(tmp_path))]
  assert len(losses) == 6
  assert losses[-1] < losses[0] - 1.0, losses


def test_sigterm_saves_at_the_step_boundary_and_resume_matches(tiny_config, tmp_path, monkeypatch):
  """SIGTERM while step 5's batch is prepared: step 5 finishes, is saved with its unlogged window, the
  run stops; the resumed run logs whole windows, every step once, bit-identical to a straight run."""
  tiny_config.train.update(steps=6, log_every=2, eval_every=0, prefetch=0)
  tiny_config.checkpoint.update(every_steps=3, async_save=False)
  train.train_and_evaluate(tiny_config, str(tmp_path / "straight"))

  real = train.host_batches

  def preempted(config, split):
    at = real(config, split)

    def batch_at(step):
      if step == 4:  # 0-based: the batch of step 5
        os.kill(os.getpid(), signal.SIGTERM)
      return at(step)
    return batch_at

  monkeypatch.setattr(train, "host_batches", preempted)
  with pytest.raises(faults.Interrupted, match="SIGTERM: saved step 5") as e:
    train.train_and_evaluate(tiny_config, str(tmp_path / "resumed"))
  assert e.value.exit_code == 0 and not os.path.exists(tmp_path / "resumed" / "lock")
  assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["3", "5"]
  assert [s for s, _ in _losses(str(tmp_path / "resumed"))] == [2, 4]
  monkeypatch.setattr(train, "host_batches", real)
  final = train.train_and_evaluate(tiny_config, str(tmp_path / "resumed"))

  assert final["step"] == 6
  straight, resumed = metrics.read(str(tmp_path / "straight")), metrics.read(str(tmp_path / "resumed"))
  assert [r["step"] for r in resumed] == [2, 4, 6]
  for a, b in zip(straight, resumed):  # Step 6's mean covers steps 5 (before the stop) and 6.
    assert {k: v for k, v in a.items() if k != "tokens_per_s"} == {
        k: v for k, v in b.items() if k != "tokens_per_s"}
  tags = metrics.tensorboard_steps(str(tmp_path / "resumed"))
  assert tags["loss"] == [2, 4, 6] and all(len(set(s)) == len(s) for s in tags.values())
  again = train.train_and_evaluate(tiny_config, str(tmp_path / "resumed"))  # Complete: nothing to do.
  assert again["step"] == 6 and again["loss"] == final["loss"]
  assert len(metrics.read(str(tmp_path / "resumed"))) == 3


def test_incompatible_workdir_is_refused(tiny_config, tmp_path):
  checkpoint.write_config(train.resolve_config(tiny_config), str(tmp_path))
  other = tiny_config.copy_and_resolve_references()
  other.model.d_model = 32
  other.model.untie = ("ffn",)
  with pytest.raises(ValueError, match=r"model\.d_model: workdir has 64, config has 32") as e:
    train.train_and_evaluate(other, str(tmp_path))
  assert "model.untie" in str(e.value) and "train.steps" not in str(e.value)


def test_model_fields_an_older_config_lacks_stand_at_their_defaults(tiny_config, tmp_path):
  """A config.json written before a model, data or freeze field existed resumes when the field keeps its
  default."""
  config = train.resolve_config(tiny_config)
  checkpoint.write_config(config, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    saved = json.load(f)
  del saved["model"]["aux_routing"], saved["model"]["norm_eps"], saved["train"]["freeze"]
  for field in ("corpus", "text_tokenizer", "text_tokenizer_fingerprint"):
    del saved["data"][field]
  with open(tmp_path / "config.json", "w") as f:
    json.dump(saved, f)
  checkpoint.check_compatible(config, str(tmp_path))
  config.model.norm_eps = 1e-6
  config.train.freeze = ("text",)
  with pytest.raises(ValueError, match=r"model\.norm_eps: workdir has 1e-05, config has 1e-06.*"
                                       r"train\.freeze: workdir has \[\], config has \['text'\]"):
    checkpoint.check_compatible(config, str(tmp_path))


def test_harmless_changes_are_allowed(tiny_config, tmp_path):
  checkpoint.write_config(train.resolve_config(tiny_config), str(tmp_path))
  later = train.resolve_config(tiny_config)
  later.train.update(steps=10_000, log_every=1, lr=1e-4)
  later.checkpoint.every_steps = 7
  later.data.cache_dir = "/elsewhere"
  checkpoint.check_compatible(later, str(tmp_path))


def test_weight_decay_mask():
  params = {"embed": {"embedding": 0}, "layers": {"attn": {"qkv": {"kernel": 0}},
            "mixer_norm": {"scale": 0, "bias": 0}, "mamba": {"A_log": 0, "D": 0, "dt_bias": 0}},
            "lm_head": {"kernel": 0}}
  mask = steps.weight_decay_mask(params)
  decayed = {jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(mask) if v}
  assert decayed == {"['layers']['attn']['qkv']['kernel']", "['lm_head']['kernel']"}
  # Boxed params (the optimizer's init): the same mask, inside the boxes.
  boxed = jax.tree.map(lambda v: nn.LogicallyPartitioned(v, ("embed",)), params)
  assert nn.meta.unbox(steps.weight_decay_mask(boxed)) == mask


def test_routing_metrics_average_over_layers():
  sown = {"layers": {"ffn": {"load": (np.array([1.0, 3.0]),)}}, "other": {"load": (np.array(5.0),)}}
  out = steps.routing_metrics(sown)
  assert set(out) == {"routing/load"}
  assert float(out["routing/load"]) == pytest.approx(3.5)  # Mean of per-site means (2, 5).


def test_bad_stage_and_mismatched_modalities(tiny_config):
  bad = tiny_config.copy_and_resolve_references()
  bad.train.stage = "warmup"
  with pytest.raises(ValueError, match="config.train.stage"):
    train.resolve_config(bad)
  bad = tiny_config.copy_and_resolve_references()
  bad.model.modalities = ("text", "image")
  with pytest.raises(ValueError, match="config.data.modalities"):
    train.resolve_config(bad)
  patches = tiny_config.copy_and_resolve_references()
  patches.data.image_form = "patches"  # Transfusion: a patch projection of p² × channels floats
  # The default mixture holds RGB scenes: grey digits join them as three equal channels.
  assert train.resolve_config(patches).model.patch_dim == 3 * patches.data.patch_size ** 2


def test_batches_are_validated_against_the_model(tiny_config, tmp_path):
  """A model vocabulary smaller than the data's is refused from the vocabulary, before any batch; a batch
  holding ids the model cannot embed is refused by the model's own check (what the prefetcher runs)."""
  config = train.resolve_config(tiny_config)
  batch = train.host_batches(config, "train")(0)
  tiny_config.model.vocab_size = 100
  with pytest.raises(ValueError, match=r"config.model.vocab_size=100 is smaller than the \d+ ids"):
    train.train_and_evaluate(tiny_config, str(tmp_path))
  config.model.vocab_size = 100
  with pytest.raises(ValueError, match=r"batch\['tokens'\] holds .* config.model.vocab_size=100"):
    steps.model_module(config).validate_batch(batch, model_config=config.model)


def test_dense_train_step_traces(data_cache_dir):
  from configs import dense

  config = dense.get_config("size=tiny")
  config.data.cache_dir = data_cache_dir
  config = train.resolve_config(config)
  model = steps.build_model(config)
  batch = train.host_batches(config, "train")(0)
  state = jax.eval_shape(lambda b: nn.unbox(steps.create_state(config, model, b)), batch)
  step = functools.partial(steps.train_step, model=model, loss_fn=decoder.loss_fn,
                           modalities=config.model.modalities, seed=0)
  new_state, out = jax.eval_shape(step, state, batch)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert {"loss", "loss/text", "aux_loss", "grad_norm"} <= set(out)


def test_params_saved_on_a_mesh_restore_onto_one_device(tiny_config, tmp_path):
  """What sampling and init.params_from read: a checkpoint from 8 devices restores whole on one."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
  spread = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "fsdp"))
  kernel = jax.device_put(np.arange(32.0).reshape(4, 8), spread)
  tiny_config.checkpoint.async_save = False
  with checkpoint.manager(str(tmp_path), tiny_config) as mngr:
    checkpoint.save(mngr, 1, {"params": {"kernel": kernel}, "step": 1}, {"rows": []}, good=True)
  restored = checkpoint.restore_params(str(tmp_path), "--workdir")["kernel"]
  assert restored.sharding.device_set == {jax.devices()[0]}
  np.testing.assert_array_equal(restored, np.arange(32.0).reshape(4, 8))
