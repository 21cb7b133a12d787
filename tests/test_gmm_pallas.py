"""Pallas gmm kernels (GPU Triton, TPU megablox) in interpret mode against the reference twin."""

import jax.numpy as jnp
import pytest

from tests.test_gmm import GROUP_CASES, PALLAS_IMPLS, _check_forward, _check_grads


@pytest.mark.parametrize("case", list(GROUP_CASES))
@pytest.mark.parametrize("impl", PALLAS_IMPLS)
def test_pallas_forward_matches_reference_fp32(impl, case):
  _check_forward(impl, case, jnp.float32)


@pytest.mark.parametrize("impl", PALLAS_IMPLS)
def test_pallas_forward_matches_reference_bf16(impl):
  _check_forward(impl, "random_with_zeros", jnp.bfloat16)


@pytest.mark.parametrize("case", ["random_with_zeros", "one_group_all_rows", "rows_past_sum"])
@pytest.mark.parametrize("impl", PALLAS_IMPLS)
def test_pallas_grads_match_reference(impl, case):
  _check_grads(impl, case)
