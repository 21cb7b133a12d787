"""The notebooks in notebooks/ execute end to end (nbclient, kernel python3) with tiny parameters.

Parameters are injected papermill-style: a cell after the one tagged `parameters` overrides its values.
The kernel runs in the repository root with it on PYTHONPATH (so `import moma` and `import configs` work
without installing) and shares one persistent XLA compilation cache across the notebooks (quickstart and
flops_matched train MoT with the same settings, so flops_matched reuses its compiled step). Every notebook but
quickstart is `slow`: `python -m pytest -q tests/test_notebooks.py -m slow`.
"""

import ast
import json
import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))


def _parameter_names(nb) -> set[str]:
  cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, "a notebook needs exactly one cell tagged `parameters`"
  return {t.id for node in ast.parse(cells[0].source).body if isinstance(node, ast.Assign)
          for t in node.targets if isinstance(t, ast.Name)}


@pytest.fixture
def kernel_env(monkeypatch, tmp_path_factory):
  """Environment the kernel inherits: the repo importable, one XLA cache for every notebook."""
  path = os.environ.get("PYTHONPATH")
  monkeypatch.setenv("PYTHONPATH", str(ROOT) + (os.pathsep + path if path else ""))
  cache = tmp_path_factory.getbasetemp().parent / "jax_cache_notebooks"
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(cache))
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")


def execute(name: str, **params):
  """Runs notebooks/<name> with `params` injected after its parameters cell; returns the executed notebook."""
  nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
  unknown = set(params) - _parameter_names(nb)
  assert not unknown, f"{name} has no parameters {sorted(unknown)}"
  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
  cell.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(index + 1, cell)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(ROOT)}}).execute()
  return nb


def _outputs(nb, output_type=None, mime=None):
  outs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  if output_type:
    outs = [o for o in outs if o.output_type == output_type]
  if mime:
    outs = [o for o in outs if mime in o.get("data", {})]
  return outs


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_without_outputs_with_setup_and_parameters(name):
  nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code), f"clear the outputs of {name}"
  assert "pip\", \"install\"" in code[0].source, "the first code cell installs moma (Colab)"
  assert "parameters" in code[1].metadata.get("tags", []), "the second code cell holds the parameters"
  assert {"workdir"} <= _parameter_names(nb)
  # Models come from moma, never from the notebook.
  assert not any("nn.Module)" in c.source for c in code)


def test_expected_notebooks_exist():
  assert {"quickstart.ipynb", "routing.ipynb", "flops_matched.ipynb", "scaling.ipynb"} <= set(NOTEBOOKS)


def test_quickstart(kernel_env, data_cache_dir, tmp_path):
  workdir = tmp_path / "quickstart"
  # One caption: each prompt length compiles its own decode.
  nb = execute("quickstart.ipynb", steps=4, log_every=2, workdir=str(workdir), data_cache_dir=data_cache_dir,
               captions=["a handwritten seven."])
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [2, 4]
  assert {"loss/text", "loss/image", "loss/audio"} <= set(rows[-1]) | set(rows[-2])
  assert len(_outputs(nb, mime="image/png")) >= 4  # losses, modality layout, decoded media, samples
  assert len(_outputs(nb, mime="text/html")) >= 1  # an audio player


@pytest.mark.slow  # ~1 min; MoMa + MoD training and routing decisions are covered by test_moma_integration
def test_routing(kernel_env, data_cache_dir, tmp_path):
  workdir = tmp_path / "routing"
  nb = execute("routing.ipynb", steps=4, workdir=str(workdir), data_cache_dir=data_cache_dir)
  assert len(_outputs(nb, mime="image/png")) >= 3  # training curves, expert heatmaps, MoD skips
  stats = json.loads((workdir / "routing_stats.json").read_text())
  assert {"trained/mod/skip/image", "initial/layer0/no_expert/audio"} <= set(stats)


@pytest.mark.slow  # trains two runs (~1 min on 2 busy cores); the training path is covered by quickstart
def test_flops_matched(kernel_env, data_cache_dir, tmp_path):
  nb = execute("flops_matched.ipynb", steps=4, log_every=2, workdir=str(tmp_path / "study"),
               data_cache_dir=data_cache_dir)
  assert {p.name for p in (tmp_path / "study").iterdir() if (p / "metrics.jsonl").exists()} == {"dense", "mot"}
  assert len(_outputs(nb, mime="image/png")) >= 2  # loss vs FLOPs, step matching


@pytest.mark.slow  # fits the committed study (no training); the fitter itself is tests/test_scaling.py
def test_scaling(kernel_env, tmp_path):
  nb = execute("scaling.ipynb", replicates=10, workdir=str(tmp_path / "figures"))
  assert {p.name for p in (tmp_path / "figures").iterdir()} >= {"scaling_all.png", "scaling_text.png"}
  assert len(_outputs(nb, mime="image/png")) >= 3  # all, text, image
  assert "mot" in "".join(o.get("data", {}).get("text/markdown", "") for o in _outputs(nb))


@pytest.mark.slow  # trains, samples 20 digits, captions and evaluates (~2 min of CPU with the compiles)
def test_transfusion(kernel_env, data_cache_dir, tmp_path):
  workdir = tmp_path / "transfusion"
  nb = execute("transfusion.ipynb", steps=4, num_steps=3, workdir=str(workdir), data_cache_dir=data_cache_dir)
  assert len(_outputs(nb, mime="image/png")) >= 3  # losses, generated digits, captioned digits
  assert (workdir / "evaluation.json").exists()
