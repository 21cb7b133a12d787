"""AGD: objectives' losses, the schedule, config errors, one compiled step per task, a short run, resume."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moma import agd
from moma import checkpoint
from moma import data
from moma import loop
from moma import objectives
from moma import steps
from moma import train

pytestmark = pytest.mark.usefixtures("compilation_cache")  # runs share their compiled task steps


def small_config(data_cache_dir, *, schedule="round_robin", untie="all"):
  """configs/agd.py shrunk to seconds: a 1-layer MoT, short documents, all six objectives."""
  from configs import agd as agd_config

  config = agd_config.get_config(f"size=tiny,untie={untie},schedule={schedule}")
  config.data.update(cache_dir=data_cache_dir, text_max_bytes=40, audio_max_samples=24)
  config.model.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, d_ff=64, max_seq_len=256)
  config.train.update(progress_bar=False, lr=1e-2, warmup_steps=2, eval_every=0, log_every=9,
                      steps=45)
  config.checkpoint.async_save = False
  task = agd.task_config
  config.agd.tasks = dict(
      lm=task("lm", ("text", "image_caption"), batch_size=4, seq_len=112),
      captioning=task("captioning", ("image_caption",), batch_size=4, seq_len=112),
      image_gen=task("image_generation", ("caption_image",), batch_size=4, seq_len=112),
      audio_text=task("audio_text", ("audio_caption",), batch_size=4, seq_len=72),
      # Pooled classification learns slowest in a 1-layer model: 4 steps per round.
      digits8=task("classification", ("image_caption",), batch_size=64, image_size=8, interval=4),
      clip16=task("contrastive", ("image_caption",), batch_size=8, image_size=16, seq_len=40),
  )
  return config


# --- objectives -------------------------------------------------------------------------------------


def test_contrastive_loss_on_a_hand_built_example():
  image = jnp.array([[1.0, 0.0], [0.0, 2.0]])  # norms differ: the loss normalises
  text = jnp.array([[3.0, 0.0], [1.0, 1.0]])
  # cosines: [[1, 1/√2], [0, 1/√2]]; scale e^0 = 1.
  c = 1 / np.sqrt(2)
  row_ce = [np.log(np.exp(1.0) + np.exp(c)) - 1.0, np.log(1.0 + np.exp(c)) - c]
  col_ce = [np.log(np.exp(1.0) + 1.0) - 1.0, np.log(np.exp(c) + np.exp(c)) - c]
  expected = 0.5 * (np.mean(row_ce) + np.mean(col_ce))
  np.testing.assert_allclose(objectives.contrastive_loss(image, text, jnp.float32(0.0)), expected,
                             rtol=1e-6)
  # A large scale on perfectly matched pairs drives the loss to zero.
  eye = jnp.eye(3)
  assert objectives.contrastive_loss(eye, eye, jnp.log(100.0)) < 1e-6


def test_retrieval_accuracy_counts_a_caption_of_the_same_label_as_right():
  image = jnp.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
  text = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
  # Images 0 and 1 both retrieve text 0: right for both (label 5), though index 1 ≠ 0; image 2
  # retrieves text 1 (first of the tied maxima), labelled 5, not 8: wrong.
  assert float(objectives.retrieval_accuracy(image, text, jnp.array([5, 5, 8]))) == pytest.approx(2 / 3)


def test_decoder_masks_score_only_their_objectives_targets(data_cache_dir):
  config = data.default_config()
  config.cache_dir = data_cache_dir
  vocab = data.vocabulary(config)
  caption = list(vocab.encode_text("a 1"))
  image = list(vocab.encode_image(np.full((2, 2), 255, np.uint8)))
  doc = [data.BOS, data.BOI, *image, data.EOI, *caption, data.EOS]  # image → caption
  n = len(doc)
  tokens = np.array([doc + [data.PAD]], np.int32)
  segment = np.array([[1] * n + [0]], np.int32)
  batch = dict(tokens=tokens, segment=segment, position=np.array([list(range(n)) + [0]], np.int32),
               targets=np.array([doc[1:] + [data.PAD, data.PAD]], np.int32),
               loss_mask=np.array([[1.0] * (n - 1) + [0.0, 0.0]], np.float32))
  table = vocab.modality_table()
  caption_mask = objectives.decoder_loss_mask(batch, objectives.OBJECTIVES["captioning"], table,
                                              config.modalities)
  # Scored: the targets after EOI (caption bytes and EOS), predicted from EOI onwards.
  eoi = doc.index(data.EOI)
  np.testing.assert_array_equal(np.nonzero(caption_mask[0])[0], np.arange(eoi, n - 1))
  image_mask = objectives.decoder_loss_mask(batch, objectives.OBJECTIVES["image_generation"], table,
                                            config.modalities)
  np.testing.assert_array_equal(np.nonzero(image_mask[0])[0], np.arange(1, 1 + len(image)))
  lm_mask = objectives.decoder_loss_mask(batch, objectives.OBJECTIVES["lm"], table, config.modalities)
  np.testing.assert_array_equal(lm_mask, batch["loss_mask"])


# --- schedule ---------------------------------------------------------------------------------------


def test_sampled_schedule_is_a_function_of_seed_and_step_and_follows_the_weights():
  schedule = agd.Schedule("sample", [1.0, 3.0], [1, 1], seed=7)
  steps = np.arange(20_000)
  picks = schedule.tasks_at(steps)
  np.testing.assert_array_equal(picks, agd.Schedule("sample", [1.0, 3.0], [1, 1], 7).tasks_at(steps))
  # Resuming at step k gives exactly the tail of the uninterrupted sequence.
  np.testing.assert_array_equal(schedule.tasks_at(steps[1234:]), picks[1234:])
  assert schedule.task_at(4321) == picks[4321]
  assert abs(np.mean(picks == 1) - 0.75) < 0.02
  assert not np.array_equal(picks, agd.Schedule("sample", [1.0, 3.0], [1, 1], 8).tasks_at(steps))
  np.testing.assert_array_equal(schedule.counts(100), np.bincount(picks[:100], minlength=2))


def test_round_robin_gives_each_task_its_interval_of_consecutive_steps():
  schedule = agd.Schedule("round_robin", [1.0, 1.0, 1.0], [2, 1, 3], seed=0)
  np.testing.assert_array_equal(schedule.tasks_at(np.arange(12)), [0, 0, 1, 2, 2, 2] * 2)
  np.testing.assert_array_equal(schedule.counts(9), [4, 2, 3])


# --- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    ("objective", "translation", "agd.tasks.lm.objective='translation' is not an objective"),
    ("weight", 0.0, "agd.tasks.lm.weight=0.0 must be positive"),
    ("loss_weight", -1.0, "agd.tasks.lm.loss_weight=-1.0 must be positive"),
    ("mixture", ("nope",), "agd.tasks.lm.mixture names 'nope'"),
])
def test_bad_task_fields_name_the_field(data_cache_dir, field, value, message):
  config = small_config(data_cache_dir)
  config.agd.tasks.lm[field] = value
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    agd.tasks_from_config(train.resolve_config(config))


def test_an_objective_whose_data_lacks_what_it_needs_is_refused(data_cache_dir):
  config = small_config(data_cache_dir)
  config.agd.tasks.captioning.mixture = ("text",)
  with pytest.raises(ValueError, match="agd.tasks.captioning: objective 'captioning' needs documents "
                                       "with text after an image"):
    agd.tasks_from_config(train.resolve_config(config))
  config = small_config(data_cache_dir)
  config.model.modalities = config.data.modalities = ("text",)
  config.data.mixture = {"text": config.data.mixture.text}
  config.agd.tasks = {"clip": agd.task_config("contrastive", ("text",), batch_size=2, seq_len=40)}
  with pytest.raises(ValueError, match="needs modality 'image'"):
    agd.tasks_from_config(train.resolve_config(config))


def test_a_task_longer_than_the_model_takes_is_refused(data_cache_dir, tmp_path):
  config = small_config(data_cache_dir)
  config.agd.tasks = {"clip32": agd.task_config("contrastive", ("image_caption",), batch_size=2,
                                                image_size=32, seq_len=40)}
  with pytest.raises(ValueError, match=r"agd.tasks.clip32.image_size gives sequences of 1024 tokens, "
                                       r"longer than config.model.max_seq_len=256"):
    train.train_and_evaluate(config, str(tmp_path))


def test_schedule_name_is_checked(data_cache_dir):
  config = small_config(data_cache_dir)
  config.agd.schedule = "shuffle"
  with pytest.raises(ValueError, match="config.agd.schedule='shuffle'"):
    agd.tasks_from_config(train.resolve_config(config))


def test_resuming_with_other_tasks_or_schedule_is_refused(data_cache_dir, tmp_path):
  checkpoint.write_config(train.resolve_config(small_config(data_cache_dir)), str(tmp_path))
  other = small_config(data_cache_dir, schedule="sample")
  other.agd.tasks.lm.batch_size = 8
  with pytest.raises(ValueError, match=r"agd\.schedule: workdir has 'round_robin', config has 'sample'") as e:
    train.train_and_evaluate(other, str(tmp_path))
  assert "agd.tasks.lm.batch_size: workdir has 4, config has 8" in str(e.value)


# --- compiled steps and the shared state ------------------------------------------------------------


def test_one_trace_per_task_one_shared_state_and_experts_train_under_both(data_cache_dir):
  """AGD with MoMa layers (config.model.ffn="moe") under a decoder objective and an encoder one: each task's
  step is traced once, both update one params + optimizer state tree, and both move the shared backbone:
  every expert weight and router, with their sown aux losses (token choice sows them) and routing metrics."""
  config = small_config(data_cache_dir, untie="none")
  config.model.ffn = "moe"
  config.model.moe = dict(layout="2t2i1a", routing="topk", top_k=1)
  config = train.resolve_config(config)
  tasks = {t.name: t for t in agd.tasks_from_config(config) if t.name in ("image_gen", "digits8")}
  sources = agd._data_sources(config, list(tasks.values()), "train")  # pylint: disable=protected-access
  state = jax.jit(lambda b: nn.unbox(steps.create_state(config, agd.objective_model(config, "classification"), b)))(
      sources["digits8"].batch(0, 0))
  structure = jax.tree.structure(state)
  assert set(state.params) == {"backbone", "contrastive_proj", "logit_scale", "classifier",
                               "classifier_bias"}
  before = jax.tree.map(np.asarray, state.params)
  cache = loop.StepCache(lambda task: agd.task_step(config, task))
  losses = {name: [] for name in tasks}
  for step, name in enumerate(["image_gen", "digits8", "image_gen", "image_gen", "digits8", "image_gen"]):
    batch = sources[name].batch(0, step)
    state, out = cache.compile(tasks[name], state, batch)(state, batch)
    assert np.isfinite(out["loss"]) and out["aux_loss"] > 0 and "routing/router_entropy" in out, (name, out)
    assert jax.tree.structure(state) == structure  # one params + optimizer state tree for all tasks
    losses[name].append(float(out["loss"]))
  assert dict(cache.traces) == {"image_gen": 1, "digits8": 1}
  assert int(state.step) == 6
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), before, jax.tree.map(np.asarray, state.params))
  assert changed["classifier"] and changed["backbone"]["embed"]["embedding"]
  assert all(jax.tree.leaves(changed["backbone"]["layers"]["ffn"])), changed  # every expert and router
  assert losses["image_gen"][-1] < losses["image_gen"][0], losses


@pytest.fixture(scope="module")
def short_run(data_cache_dir, tmp_path_factory):
  """5 rounds of round-robin over all six objectives (9 steps a round), logged every round."""
  config = small_config(data_cache_dir)
  workdir = str(tmp_path_factory.mktemp("agd_run"))
  return config, workdir, train.train_and_evaluate(config, workdir)


@pytest.mark.slow  # ~2 minutes on 2 busy CPU cores: six compilations, 45 steps.
def test_every_objectives_loss_falls_and_each_task_compiles_once(short_run):
  from moma import metrics

  config, workdir, final = short_run
  assert final["compilations"] == 6
  rows = metrics.read(workdir)
  assert [r["step"] for r in rows] == [9, 18, 27, 36, 45]
  for name, task in config.agd.tasks.items():
    losses = [r[f"task/{name}/loss"] for r in rows]
    assert np.mean(losses[-2:]) < losses[0] - 0.05, (name, losses)
    assert [r[f"task/{name}/steps"] for r in rows] == [task.interval * k for k in range(1, 6)]
  for key in ("loss", "loss/text", "loss/image", "tokens_per_s", "flops_per_token",
              "grad_norm", "task/digits8/accuracy", "task/clip16/accuracy"):
    assert np.isfinite(rows[-1][key]), key


def resume_config(data_cache_dir, steps):
  c = small_config(data_cache_dir, schedule="sample")
  c.agd.tasks = {k: v for k, v in c.agd.tasks.items() if k in ("image_gen", "digits8")}
  c.train.update(steps=steps, log_every=2, min_lr_ratio=1.0)  # lr independent of train.steps
  c.checkpoint.every_steps = 4
  return c


def test_a_resumed_plan_draws_the_same_tasks_and_batches(data_cache_dir):
  """What a run resumed at step 4 trains next (a fresh `agd.plan`, as a new process builds it) is what the
  uninterrupted run trains: the same task and host batch at every step. The slow twin trains both runs
  through the trainer: test_resume_continues_the_same_schedule_and_batches."""
  config = train.resolve_config(resume_config(data_cache_dir, 8))
  straight, resumed = agd.plan(config), agd.plan(config)
  drawn = [(straight.task_at(i), straight.tasks[straight.task_at(i)].batch_at(i)) for i in range(8)]
  assert len({t for t, _ in drawn}) == 2  # both tasks come up
  for i in range(4, 8):
    task = resumed.task_at(i)
    assert task == drawn[i][0]
    jax.tree.map(np.testing.assert_array_equal, resumed.tasks[task].batch_at(i), drawn[i][1])


@pytest.mark.slow  # three AGD runs, each tracing two task steps: ~2 minutes on 2 idle cores
def test_resume_continues_the_same_schedule_and_batches(data_cache_dir, tmp_path):
  """4 steps, then 4 more from the checkpoint == 8 steps straight (same metrics, same state)."""
  from moma import metrics

  config = functools.partial(resume_config, data_cache_dir)
  train.train_and_evaluate(config(8), str(tmp_path / "straight"))
  train.train_and_evaluate(config(4), str(tmp_path / "resumed"))
  final = train.train_and_evaluate(config(8), str(tmp_path / "resumed"))
  assert final["compilations"] == len({r for r in agd.Schedule.from_tasks(
      "sample", agd.tasks_from_config(train.resolve_config(config(8))), 0).tasks_at(range(4, 8))})
  straight, resumed = metrics.read(str(tmp_path / "straight")), metrics.read(str(tmp_path / "resumed"))
  assert [r["step"] for r in resumed] == [2, 4, 6, 8]
  for a, b in zip(straight, resumed):
    assert set(a) == set(b)
    for key in a:
      if key not in ("tokens_per_s",):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
