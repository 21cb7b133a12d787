"""`experiments.accelerator_check`: its --tiny mode end to end on CPU, the gmm `auto` rule and the batch search."""

import json
import math

import jax
import pytest

from experiments import accelerator_check as check
from experiments import accelerator_report
from moma import kernels

SECTIONS = ("gmm", "attention", "mfu", "largest_batch")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data_cache_dir):
  """(JSON report, stdout) of one --tiny run."""
  out = tmp_path_factory.mktemp("accelerator_check") / "report.json"
  capture = pytest.MonkeyPatch()
  printed = []
  capture.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(map(str, a))))
  try:
    check.main(["--tiny", f"--out={out}", f"--data_cache_dir={data_cache_dir}"])
  finally:
    capture.undo()
  return json.loads(out.read_text()), "\n".join(printed)


def positive(x):
  return isinstance(x, float) and math.isfinite(x) and x > 0


def test_tiny_run_measures_every_section(tiny):
  report, _ = tiny
  assert report["tiny"] and report["machine"]["jax"]
  for name in SECTIONS:
    section = report["sections"][name]
    assert section["rows"] and not section["skipped"], (name, section["skipped"])
    for row in section["rows"]:
      assert not row.get("errors"), (name, row["errors"])
  # --tiny pretends to be a GPU: the TPU kernels are refused with moma's reason, the GPU ones interpreted.
  gmm, attention = report["sections"]["gmm"], report["sections"]["attention"]
  assert "pallas_gpu" in gmm["impls"] and "needs a TPU" in gmm["skipped_impls"]["pallas_tpu"]
  assert "pallas_gpu" in attention["impls"] and "splash" in attention["skipped_impls"]
  for section, baseline in ((gmm, "dense"), (attention, "xla")):
    for row in section["rows"]:
      assert set(row["ms"]) == {baseline, *section["impls"]}
      assert all(positive(ms) for ms in row["ms"].values())
      for impl, ratio in row["ratio"].items():
        assert ratio == pytest.approx(row["ms"][impl] / row["ms"][baseline])
  for row in report["sections"]["mfu"]["rows"]:
    # Any positive MFU: --tiny's "peak" is a tiny matmul timed on a loaded CPU (18x it has been seen).
    assert positive(row["step_ms"]) and positive(row["tokens_per_s"]) and positive(row["mfu"])
  for row in report["sections"]["largest_batch"]["rows"]:
    assert row["largest"] >= 1 and row["confirmed"]


def test_tiny_run_prints_the_benchmarks_block_and_auto(tiny):
  report, printed = tiny
  assert "Command: `python -m experiments.accelerator_check --tiny" in printed
  assert "Machine: cpu" in printed
  assert sum(line.startswith("| --- |") for line in printed.splitlines()) == len(SECTIONS)
  assert report["gmm_auto"]["impl"] in report["sections"]["gmm"]["impls"]
  assert f"gmm_impl=auto → {report['gmm_auto']['impl']}" in printed


def test_no_budget_skips_every_item_with_a_reason(tmp_path):
  report = check.main(["--tiny", "--budget_s=0", f"--out={tmp_path / 'r.json'}"])
  for name in SECTIONS:
    section = report["sections"][name]
    assert not section["rows"] and section["skipped"]
    assert all("time budget" in s["reason"] for s in section["skipped"])
  assert report["gmm_auto"]["impl"] is None


def test_a_state_larger_than_the_device_fits_no_batch_without_compiling(data_cache_dir, monkeypatch):
  monkeypatch.setattr(check, "step_bytes_at", lambda *a, **k: pytest.fail("compiled a step"))
  row = check.batch_row(check.TINY, "dense", 1024, _Budget(), data_cache_dir)
  assert row["state_bytes"] > 1024 and row["largest"] == 0 and row["confirmed"]


@pytest.mark.gpu
@pytest.mark.tpu
@pytest.mark.skipif(jax.default_backend() not in ("gpu", "tpu"), reason="needs a GPU or TPU")
def test_every_kernel_runs_on_the_accelerator(tmp_path):
  """`pytest -m gpu` (or tpu) on hardware: each impl the backend takes runs at the full shapes."""
  report = check.main(["--sections=gmm,attention", "--budget_s=600", f"--out={tmp_path / 'r.json'}"])
  for name in ("gmm", "attention"):
    section = report["sections"][name]
    assert section["rows"] and not section["skipped"], section["skipped"]
    assert all(not row["errors"] for row in section["rows"]), [row["errors"] for row in section["rows"]]


def _row(dense, **ms):
  return {"ms": {"dense": dense, **ms}, "ratio": {k: v / dense for k, v in ms.items()}}


def test_auto_is_the_impl_fastest_on_most_rows():
  rows = [_row(1.0, xla=2.0, ragged_dot=1.5), _row(1.0, xla=1.2, ragged_dot=1.1),
          _row(1.0, xla=1.0, ragged_dot=9.0)]
  auto = accelerator_report.choose_gmm_auto(rows, "gpu")
  assert auto["impl"] == "ragged_dot" and auto["wins"] == {"xla": 1, "ragged_dot": 2}
  assert "resolve_impl: return 'ragged_dot' when jax.default_backend() == 'gpu'" in auto["where"]


def test_auto_ties_go_to_the_lower_geomean_then_to_impls_order():
  rows = [_row(1.0, xla=2.0, pallas_gpu=1.9), _row(1.0, xla=1.0, pallas_gpu=3.0)]
  assert accelerator_report.choose_gmm_auto(rows, "gpu")["impl"] == "xla"  # 1 win each; geomean 1.41 vs 2.39
  rows = [_row(1.0, xla=2.0, pallas_gpu=1.0), _row(1.0, xla=1.0, pallas_gpu=2.0)]
  # Same geomean: kernels.IMPLS order.
  assert accelerator_report.choose_gmm_auto(rows, "gpu")["impl"] == kernels.IMPLS[1] == "xla"


class _Budget:
  def __init__(self, calls_left=math.inf):
    self.calls_left = calls_left

  def over(self):
    self.calls_left -= 1
    return "time budget" if self.calls_left < 0 else None


@pytest.mark.parametrize("need, limit, largest", [
    (lambda b: 10 + 3 * b, 40, 10),  # linear: the guess is right
    (lambda b: 10 + 3 * b + b * b // 4, 60, 9),  # convex: bisection below the guess
    (lambda b: 10 + 3 * b - (b > 2) * b, 40, 15),  # concave: doubling above the guess
    (lambda b: 50 + b, 40, 0),  # the state alone does not fit
])
def test_largest_batch_search(need, limit, largest):
  tried = []
  found = check.largest_batch(lambda b: tried.append(b) or need(b), limit, _Budget())
  assert found == dict(largest=largest, tried=found["tried"], confirmed=True,
                       linear_estimate=found["linear_estimate"])
  assert all(need(b) <= limit for b in range(1, largest + 1)) and need(largest + 1) > limit
  assert len(tried) == len(set(tried)) <= 10  # each batch compiled once


def test_largest_batch_search_stops_unconfirmed_at_the_budget():
  found = check.largest_batch(lambda b: 10 + 3 * b + b * b // 4, 60, _Budget(calls_left=0))
  assert found["tried"].keys() == {1, 2} and not found["confirmed"] and found["largest"] == 2
  assert found["linear_estimate"] == 12  # need(1) = 13, need(2) = 17: 4 bytes a row, 47 left
