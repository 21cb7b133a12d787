"""Hugging Face checkpoints in and out: `import_hf(hf_dir, workdir)` and `export_hf(workdir, hf_dir)`.

Import reads config.json and the `*.safetensors` files (one, or shards named by model.safetensors.index.json)
with safetensors' numpy API, tensor by tensor: each is read, cast to the param's dtype and placed into the
param tree, so the host holds the weights once plus one tensor. Everything is checked (config.json keys,
every tensor's presence and shape, tensors moma has no place for) before anything is written, and the run
directory appears whole (built beside it, then renamed). Families and their tensors: `families`.

Token ids (docs/weights.md): moma's vocabulary puts its own specials first (`moma.data.TEXT_OFFSET` ids),
then the text tokenizer's ids. An imported model keeps that layout (`Layout`): HF id t is moma id
TEXT_OFFSET + t, moma's BOS / EOS rows are copies of HF's bos / eos rows, and its other specials start at
the mean of the text rows. Export reverses it. The run directory also keeps the HF config.json and
tokenizer files under hf/ (export writes them back), and a config.py that loads config.json, so that
`python -m moma.main --config=RUN/config.py --workdir=RUN` resumes the step-0 checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import shutil

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from moma import checkpoint
from moma import data
from moma import steps
from moma import train
from moma.models import model_config
from moma.weights import families

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")
RESUME_CONFIG = '''"""The imported run's config: its config.json (moma.weights wrote this file)."""
import json
import os

import ml_collections


def get_config(arg=None):
  del arg
  with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))
'''


@dataclasses.dataclass(frozen=True)
class Layout:
  """HF id t ↔ moma id TEXT_OFFSET + t. Rows of moma's BOS / EOS copy HF's `bos` / `eos` rows (None: the
  checkpoint names none); its other specials start at the mean of the text rows."""

  bos: int | None
  eos: int | None

  @classmethod
  def of(cls, hf: dict) -> Layout:
    first = lambda i: i[0] if isinstance(i, list) else i  # Llama 3 lists several eos ids
    return cls(first(hf.get("bos_token_id")), first(hf.get("eos_token_id")))

  def _pairs(self):
    return [(moma_id, hf_id) for moma_id, hf_id in ((data.BOS, self.bos), (data.EOS, self.eos))
            if hf_id is not None]

  def to_moma(self, rows):
    mean = rows.mean(0, dtype=np.float64, keepdims=True).astype(rows.dtype)  # no float64 copy of the rows
    specials = np.repeat(mean, data.TEXT_OFFSET, 0)
    for moma_id, hf_id in self._pairs():
      specials[moma_id] = rows[hf_id]
    return np.concatenate([specials, rows])

  def to_hf(self, rows):
    """The HF rows; where bos and eos coincide, moma's EOS row wins."""
    out = rows[data.TEXT_OFFSET:].copy()
    for moma_id, hf_id in self._pairs():
      out[hf_id] = rows[moma_id]
    return out


def _to_moma(t: families.Tensor, array, shape, layout: Layout | None, name: str):
  if t.vocab and layout:
    array = layout.to_moma(array)
  if t.kind == "linear":
    return array.T.reshape(shape)
  if t.kind == "conv":
    return array[:, 0, :].T
  if t.kind == "heads":
    if not (array == array[:1]).all():
      raise ValueError(f"tensor {name} holds a different QK-norm table per head; moma's QK-norm has one "
                       f"[head_dim] table shared by the heads, so this checkpoint cannot be imported")
    return array[0]
  return array


def _to_hf(t: families.Tensor, array, layout: Layout | None):
  if t.kind == "linear":
    array = array.reshape(array.shape[0], -1).T
  elif t.kind == "conv":
    array = array.T[:, None, :]
  elif t.kind == "heads":
    array = np.broadcast_to(array, (t.repeat, *array.shape))
  if t.vocab and layout:
    array = layout.to_hf(array)
  return np.ascontiguousarray(array)


def _hf_shape(t: families.Tensor, shape, layout: Layout | None) -> tuple[int, ...]:
  """The HF shape of a moma slot's `shape`."""
  out = {"linear": lambda: (int(np.prod(shape[1:])), shape[0]), "conv": lambda: (shape[1], 1, shape[0]),
         "heads": lambda: (t.repeat, *shape), "same": lambda: tuple(shape)}[t.kind]()
  return (out[0] - data.TEXT_OFFSET, *out[1:]) if t.vocab and layout else out


def _slot_shape(t: families.Tensor, leaf_shape) -> tuple[int, ...]:
  shape = tuple(leaf_shape[1:] if t.stacked else leaf_shape)
  return shape if t.slot is None else shape[:1] + shape[2:]


def _names(t: families.Tensor, num_layers: int) -> list[tuple[int | None, str]]:
  return [(i, t.name.format(i=i)) for i in range(num_layers)] if t.stacked else [(None, t.name)]


def _read_json(path: str, what: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except OSError as e:
    raise ValueError(f"{what}: cannot read {path} ({e.strerror}); name a Hugging Face model "
                     "directory") from None
  except ValueError as e:
    raise ValueError(f"{what}: {path} is not JSON ({e})") from None


def _tensor_files(hf_dir: str) -> dict[str, str]:
  """Tensor name → its safetensors file (model.safetensors.index.json's weight_map, else every file's)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.exists(index):
    weight_map = _read_json(index, "--hf").get("weight_map", {})
    return {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
  files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
  if not files:
    raise ValueError(f"--hf={hf_dir}: no *.safetensors file there (a .bin checkpoint needs torch; convert it "
                     "to safetensors first)")
  out = {}
  for file in files:
    with safe_open(file, "np") as f:
      out.update(dict.fromkeys(f.keys(), file))
  return out


def _check_new_dir(path: str, flag: str) -> None:
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise ValueError(f"{flag}={path} already exists and is not an empty directory; name a new directory")


@contextlib.contextmanager
def _built_beside(path: str):
  """A fresh directory beside `path` that becomes `path` when the block succeeds (removed otherwise)."""
  tmp = os.path.abspath(path).rstrip("/") + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.isdir(path):
    os.rmdir(path)  # empty (checked before)
  os.replace(tmp, path)


def _size_preset(family: str, d_model: int) -> str:
  """The preset (configs/common.SIZES) nearest in width: its train settings start the imported run."""
  from configs import common, mamba  # pylint: disable=g-import-not-at-top
  sizes = mamba.NUM_LAYERS if family == "mamba" else common.SIZES
  return min(sizes, key=lambda size: abs(np.log(common.SIZES[size]["d_model"] / d_model)))


def run_config(family: str, fields: dict, vocab_size: int, dtype: str) -> ml_collections.ConfigDict:
  """A full moma config (configs/dense.py or configs/mamba.py at the nearest size, text only) whose
  config.model is the checkpoint's."""
  from configs import common, mamba  # pylint: disable=g-import-not-at-top
  size = _size_preset(family, fields["d_model"])
  config = (mamba.mamba_config(size, "text") if family == "mamba" else common.base_config(size, ("text",)))
  fields = dict(fields, vocab_size=vocab_size, dtype=dtype, param_dtype=dtype)
  if "mamba" in fields:
    config.model.mamba.update(fields.pop("mamba"))
  config.model.update(fields)
  config.train.seq_len = min(config.train.seq_len, config.model.max_seq_len)
  return train.resolve_config(config)


def _abstract_params(model) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  """Param path → shape and dtype, by an abstract init (nothing computed)."""
  batch = {k: jax.ShapeDtypeStruct((1, 8), np.int32) for k in ("tokens", "modality", "segment", "position")}
  abstract = nn.unbox(jax.eval_shape(lambda b: model.init(jax.random.key(0), b)["params"], batch))
  return {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}


def _check_tensors(hf_dir, files, table, leaves, layout, num_layers, tied) -> None:
  """Every tensor of `table` is there with the shape config.json implies, and nothing else is (but what
  `families.NOT_THE_LM` names, and a tied lm_head, compared when read)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  expected = {}
  for t in table:
    for _, name in _names(t, num_layers):
      expected[name] = _hf_shape(t, _slot_shape(t, leaves[t.path].shape), layout)
  for name, shape in expected.items():
    if name not in files:
      raise ValueError(f"--hf={hf_dir}: missing tensor {name} (config.json implies shape {shape})")
    with safe_open(files[name], "np") as f:
      got = tuple(f.get_slice(name).get_shape())
    if got != shape:
      raise ValueError(f"--hf={hf_dir}: tensor {name} has shape {got}, config.json implies {shape}")
  ignored = tuple(families.NOT_THE_LM) + (("lm_head.weight",) if tied else ())
  extra = sorted(n for n in files if n not in expected and not any(k in n for k in ignored))
  if extra:
    raise ValueError(f"--hf={hf_dir}: tensor {extra[0]} ({len(extra)} such) has no place in moma's "
                     "model (a bias or layer moma lacks); not imported")


def import_hf(hf_dir: str, workdir: str, dtype: str = "float32") -> str:
  """Writes the HF checkpoint in `hf_dir` as a moma run in `workdir` (step 0); returns a summary line."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  if dtype not in model_config.DTYPES:
    raise ValueError(f"--dtype={dtype!r}: expected one of {model_config.DTYPES}")
  _check_new_dir(workdir, "--workdir")
  hf = _read_json(os.path.join(hf_dir, "config.json"), "--hf")
  try:
    family, fields = families.model_fields(hf)
  except KeyError as e:
    raise ValueError(f"--hf={hf_dir}: config.json has no {e.args[0]!r}, which its family needs") from None
  files = _tensor_files(hf_dir)
  embedding = families.embedding_name(family)
  if embedding not in files:
    raise ValueError(f"--hf={hf_dir}: missing tensor {embedding}")
  with safe_open(files[embedding], "np") as f:
    hf_vocab = f.get_slice(embedding).get_shape()[0]
  if hf_vocab != hf.get("vocab_size", hf_vocab):
    raise ValueError(f"--hf={hf_dir}: tensor {embedding} has {hf_vocab} rows, config.json vocab_size="
                     f"{hf['vocab_size']}")
  layout = Layout.of(hf)
  for key, hf_id in (("bos_token_id", layout.bos), ("eos_token_id", layout.eos)):
    if hf_id is not None and not 0 <= hf_id < hf_vocab:
      raise ValueError(f"--hf={hf_dir}: config.json {key}={hf_id} is outside the {hf_vocab} token ids")
  config = run_config(family, fields, data.TEXT_OFFSET + hf_vocab, dtype)
  model = steps.build_model(config)
  cfg, leaves = model.config, _abstract_params(model)
  table = families.tensors(family, cfg)
  assert {t.path for t in table} == set(leaves), (sorted(leaves), table)  # every param has its tensors
  _check_tensors(hf_dir, files, table, leaves, layout, cfg.num_layers, cfg.tie_embeddings)

  params = {path: np.empty(a.shape, a.dtype) for path, a in leaves.items()}
  with contextlib.ExitStack() as stack:
    opened = {file: stack.enter_context(safe_open(file, "np")) for file in set(files.values())}
    read = lambda name: opened[files[name]].get_tensor(name)
    for t in table:
      for i, name in _names(t, cfg.num_layers):
        leaf = params[t.path] if i is None else params[t.path][i]
        value = _to_moma(t, read(name), _slot_shape(t, leaves[t.path].shape), layout, name)
        if t.slot is None:
          leaf[...] = value
        else:
          leaf[:, t.slot] = value
    if cfg.tie_embeddings and "lm_head.weight" in files and not np.array_equal(read("lm_head.weight"),
                                                                                read(embedding)):
      raise ValueError(f"--hf={hf_dir}: config.json tie_word_embeddings=true, but tensor lm_head.weight "
                       f"differs from {embedding}: set tie_word_embeddings=false there if it is untied")
  tree = {}
  for path, value in params.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  with _built_beside(workdir) as tmp:
    _write_run(tmp, hf_dir, hf, config, model, tree)
  return (f"imported {family} ({cfg.num_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}, "
          f"{cfg.param_dtype}) into {workdir} at step 0; train it with: python -m moma.main "
          f"--config={os.path.join(workdir, 'config.py')} --workdir={workdir}")


def _write_run(run_dir, hf_dir, hf, config, model, params) -> None:
  """config.json, config.py, hf/ (HF config and tokenizer files) and the step-0 checkpoint (the train
  state with a fresh optimizer state, as `checkpoint.save` writes it)."""
  checkpoint.write_config(config, run_dir)
  with open(os.path.join(run_dir, "config.py"), "w") as f:
    f.write(RESUME_CONFIG)
  os.makedirs(os.path.join(run_dir, "hf"))
  with open(os.path.join(run_dir, "hf", "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(hf_dir, name)):
      shutil.copy(os.path.join(hf_dir, name), os.path.join(run_dir, "hf", name))
  state = steps.TrainState.create(apply_fn=model.apply, params=params, tx=steps.make_optimizer(config.train))
  mngr = checkpoint.manager(run_dir, config)
  try:
    os.makedirs(str(mngr.directory))
    checkpoint.save(mngr, 0, state, dict(rows=[], seconds=0.0), good=True)
    checkpoint.wait(mngr)
  finally:
    mngr.close()


def export_hf(workdir: str, hf_dir: str) -> str:
  """Writes the dense or Mamba run in `workdir` (its latest checkpoint) as an HF directory `hf_dir`."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  config = checkpoint.read_config(workdir, "--workdir")
  cfg = model_config.ModelConfig.from_config(config["model"])
  family = families.family_of(cfg)
  _check_new_dir(hf_dir, "--hf")
  origin = os.path.join(workdir, "hf")
  base = _read_json(os.path.join(origin, "config.json"), "--workdir") if os.path.isdir(origin) else {}
  if base:  # an imported run: HF's ids (Layout) and its own special ids
    layout, vocab = Layout.of(base), cfg.vocab_size - data.TEXT_OFFSET
    special_ids = {k: base[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in base}
  else:  # a run trained in moma: its own vocabulary, ids and specials as they are
    layout, vocab = None, cfg.vocab_size
    special_ids = dict(bos_token_id=data.BOS, eos_token_id=data.EOS, pad_token_id=data.PAD)
  params = checkpoint.restore_params(workdir, "--workdir")
  out = {}
  for t in families.tensors(family, cfg):
    leaf = np.asarray(_get(params, t.path))
    for i, name in _names(t, cfg.num_layers):
      value = leaf if i is None else leaf[i]
      out[name] = _to_hf(t, value if t.slot is None else value[:, t.slot], layout)
  with _built_beside(hf_dir) as tmp:
    save_file(out, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(families.hf_config(family, cfg, base, vocab, special_ids), f, indent=2)
    for name in TOKENIZER_FILES if base else ():
      if os.path.exists(os.path.join(origin, name)):
        shutil.copy(os.path.join(origin, name), os.path.join(tmp, name))
  return f"exported {workdir} as {families.ARCHITECTURES[family]} ({len(out)} tensors) to {hf_dir}"


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree
