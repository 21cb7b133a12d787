"""Counter-based uniform draws for the generated datasets: a pure function of a key, ~2 µs per key
(a numpy Generator costs ~15 µs to seed, more than rendering a scene)."""

from __future__ import annotations

import hashlib

import numpy as np


def uniforms_block(keys, n: int) -> np.ndarray:
  """float64 [len(keys), n] in [0, 1): row i from blake2b digests of `keys[i]` and a block counter (16
  draws per block), so a row depends on its key alone."""
  blocks = -(-n // 16)
  digests = b"".join(hashlib.blake2b(f"{key}/{b}".encode(), digest_size=64).digest()
                     for key in keys for b in range(blocks))
  return np.frombuffer(digests, np.uint32).reshape(len(keys), 16 * blocks)[:, :n] * 2.0**-32


def uniforms(key: str, n: int) -> list[float]:
  """The n draws of one key (`uniforms_block([key], n)[0]`) as Python floats."""
  return uniforms_block([key], n)[0].tolist()
