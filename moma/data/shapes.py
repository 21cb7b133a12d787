"""Images of scenes (`moma.data.scenes`): rendering, the exact detector, discrete codes, and the endless
image–caption set.

A shape is drawn centred in its 8×8 cell of an RGB image on black. `detect(image)` reads an image back
into its scene (None if any pixel is not part of a rendered shape), so generation accuracy is an exact
comparison of scenes. `Examples` is the dataset: {"image", "caption", "codes"} as a pure function of
(seed, split, index).

Discrete image form: one code per p×p patch (p = `data.patch_size`): 0 for background, else
1 + (colour index)·(2^(p²) − 1) + (mask − 1), with `mask` the patch's p² pixel bits. Shapes stay inside
their cells and cells are multiples of p, so a patch holds at most one colour and the codes are lossless.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np

from moma.data import draws
from moma.data import scenes

def num_codes(knobs, patch_size: int) -> int:
  """Discrete image codes a scene needs at this patch size (background + colour × non-empty mask)."""
  return 1 + scenes.validate(knobs).palette * (2 ** (patch_size * patch_size) - 1)


def _mask(kind: str, side: int) -> np.ndarray:
  y, x = np.mgrid[:side, :side]
  c = side // 2
  if kind == "square":
    return np.ones((side, side), bool)
  if kind == "circle":  # a disc: small is a plus, large a square with cut corners
    return np.abs(y - c) + np.abs(x - c) <= 2 * c - 1
  if kind == "cross":  # the two diagonals
    return np.abs(y - c) == np.abs(x - c)
  rows = (side + 1) // 2  # triangle pointing up: rows of width 1, 3, …, side
  return np.abs(x[:rows] - c) <= y[:rows]


_MASKS = {(kind, size): _mask(kind, side) for kind in scenes.KINDS for size, side in scenes.SIZES.items()}
_BY_MASK = {(m.shape, m.tobytes()): key for key, m in _MASKS.items()}


def _origin(shape: scenes.Shape) -> tuple[int, int]:
  h, w = _MASKS[shape.kind, shape.size].shape
  return shape.row * scenes.CELL + (scenes.CELL - h) // 2, shape.col * scenes.CELL + (scenes.CELL - w) // 2


@functools.lru_cache(maxsize=64)
def _sprites(image_size: int, patch_size: int) -> dict:
  """(kind, size, row, col) → (flat pixel indices, flat indices of the patches it touches, their bits)
  of a shape drawn in that cell."""
  grid, p = image_size // scenes.CELL, patch_size
  sprites = {}
  for (kind, size), mask in _MASKS.items():
    for row in range(grid):
      for col in range(grid):
        y, x = _origin(scenes.Shape(kind, "", size, row, col))
        full = np.zeros((image_size, image_size), bool)
        full[y:y + mask.shape[0], x:x + mask.shape[1]] = mask
        bits = full.reshape(image_size // p, p, image_size // p, p).transpose(0, 2, 1, 3)
        bits = (bits.reshape(-1, p * p) * (1 << np.arange(p * p))).sum(-1)
        sprites[kind, size, row, col] = (np.flatnonzero(full), np.flatnonzero(bits), bits[bits > 0])
  return sprites


@functools.lru_cache(maxsize=16)
def _palette(palette: int) -> np.ndarray:
  """uint8 [palette + 1, 3]: black background, then the scene colours."""
  return np.array([(0, 0, 0)] + list(scenes.COLOURS.values())[:palette], np.uint8)


def render(scene, knobs, patch_size: int = 0):
  """Scene → uint8 RGB image [image_size, image_size, 3]; with `patch_size`, also its discrete codes."""
  k = scenes.validate(knobs)
  scenes.check(scene, k)
  return _draw(scene, k, patch_size)


def _draw(scene, k: scenes.Knobs, patch_size: int):
  sprites = _sprites(k.image_size, patch_size or 1)
  index = np.zeros(k.image_size * k.image_size, np.int32)
  codes = np.zeros((k.image_size // (patch_size or 1)) ** 2, np.int32)
  per_colour = 2 ** (patch_size * patch_size) - 1
  for shape in scene:
    pixels, patches, bits = sprites[shape.kind, shape.size, shape.row, shape.col]
    colour = scenes.COLOUR_NAMES.index(shape.colour)
    index[pixels] = colour + 1
    codes[patches] = colour * per_colour + bits  # 1 + colour·(2^(p²) − 1) + (bits − 1)
  image = _palette(k.palette)[index].reshape(k.image_size, k.image_size, 3)
  return (image, codes) if patch_size else image


def detect(image: np.ndarray, knobs) -> tuple[scenes.Shape, ...] | None:
  """Image → its scene (shapes in cell order), or None unless every non-black pixel belongs to a shape
  drawn exactly where `render` draws it."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  k = scenes.validate(knobs)
  image = np.asarray(image)
  if image.shape != (k.image_size, k.image_size, 3):
    return None
  match = np.all(image[:, :, None, :] == _palette(k.palette)[None, None], axis=-1)
  if not match.any(-1).all():
    return None  # a colour outside the palette
  index = match.argmax(-1)
  shapes = []
  for colour_id in np.unique(index[index > 0]):
    labels, _ = ndimage.label(index == colour_id, structure=np.ones((3, 3)))
    for box in ndimage.find_objects(labels):
      mask = labels[box] > 0
      key = _BY_MASK.get((mask.shape, mask.tobytes()))
      if key is None:
        return None
      row, col = box[0].start // scenes.CELL, box[1].start // scenes.CELL
      shape = scenes.Shape(key[0], scenes.COLOUR_NAMES[colour_id - 1], key[1], row, col)
      if row >= k.grid or col >= k.grid or _origin(shape) != (box[0].start, box[1].start):
        return None
      shapes.append(shape)
  shapes.sort(key=lambda s: (s.row, s.col))
  cells = [(s.row, s.col) for s in shapes]
  return tuple(shapes) if len(set(cells)) == len(cells) else None


def decode_codes(codes, knobs, patch_size: int) -> np.ndarray:
  """Discrete codes → RGB image; codes past `num_codes` (e.g. from a sampled image) decode as
  background."""
  k = scenes.validate(knobs)
  p, s = patch_size, k.image_size
  per_colour = 2 ** (p * p) - 1
  codes = np.asarray(codes, np.int64).reshape(-1)
  codes = np.where(codes < num_codes(k, p), codes, 0)
  colour = np.where(codes > 0, (codes - 1) // per_colour + 1, 0)
  bits = np.where(codes > 0, (codes - 1) % per_colour + 1, 0)
  on = (bits[:, None] >> np.arange(p * p)) & 1
  index = (on * colour[:, None]).reshape(s // p, s // p, p, p).transpose(0, 2, 1, 3).reshape(s, s)
  return _palette(k.palette)[index]


def features(knobs) -> dict:
  """TFDS feature specs of an example (what `moma.data.sources` reads)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  size = scenes.validate(knobs).image_size
  return {"image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
          "caption": tfds.features.Text(), "codes": tfds.features.Tensor(shape=(None,), dtype=np.int32)}


@functools.lru_cache(maxsize=64)
def _sprite_tables(image_size: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Dense `_sprites`: pixel masks bool [kind·size, cell, S²] and patch bits int64 [kind·size, cell, P]
  (0 where the shape does not touch the patch), kind·size = kind index · len(scenes.SIZES) + size index."""
  grid, s, p = image_size // scenes.CELL, image_size, patch_size
  pixels = np.zeros((len(scenes.KINDS) * len(scenes.SIZES), grid * grid, s * s), bool)
  bits = np.zeros((len(scenes.KINDS) * len(scenes.SIZES), grid * grid, (s // p) ** 2), np.int64)
  for (kind, size, row, col), (pixel_ids, patch_ids, patch_bits) in _sprites(s, p).items():
    shape = scenes.KINDS.index(kind) * len(scenes.SIZES) + scenes.SIZE_NAMES.index(size)
    pixels[shape, row * grid + col, pixel_ids] = True
    bits[shape, row * grid + col, patch_ids] = patch_bits
  return pixels, bits


class Examples:
  """Random access to scenes {"image", "caption", "codes"} of one split, a pure function of
  (seed, split, index); "codes" are the discrete codes at `patch_size`. `block(indices)` renders many
  scenes at once with numpy (what the packer uses); `examples[i]` is its per-scene reference."""

  def __init__(self, knobs, split: str, patch_size: int):
    self.knobs, self.patch_size = scenes.validate(knobs), patch_size
    self.split_id, self.num_draws = zlib.crc32(split.encode()), scenes.scene_draws(knobs)

  def __len__(self) -> int:
    return 2**31 - 1

  def _key(self, index: int) -> str:
    return f"shapes/{self.knobs.seed}/{self.split_id}/{index}"

  def __getitem__(self, index: int) -> dict:
    k = self.knobs
    scene = scenes.random_scene(k, draws.uniforms(self._key(index), self.num_draws))
    drawn = _draw(scene, k, self.patch_size)
    image, codes = drawn if self.patch_size else (drawn, None)
    return {"image": image, "caption": scenes.describe(scene, k), "codes": codes}

  def block(self, indices) -> dict:
    """`[self[i] for i in indices]` as columns: "caption" (list of str) and, with a patch size, "codes"
    int32 [n, P], else "image" uint8 [n, S, S, 3] (each path renders only the image form it feeds)."""
    k = self.knobs
    valid, cell, kind, colour, size = scenes.random_scenes(
        k, draws.uniforms_block([self._key(i) for i in indices], self.num_draws))
    shape_id = kind * len(scenes.SIZES) + size
    pixels, bits = _sprite_tables(k.image_size, self.patch_size or 1)
    rows, cols = np.divmod(cell, k.grid)
    captions = [scenes.describe([scenes.Shape(scenes.KINDS[t], scenes.COLOUR_NAMES[c], scenes.SIZE_NAMES[z], r, q)
                          for t, c, z, r, q, v in zip(*scene) if v], k)
                for scene in zip(*(a.tolist() for a in (kind, colour, size, rows, cols, valid)))]
    cell = np.minimum(cell, k.grid * k.grid - 1)  # slots past the count read any cell; `valid` masks them
    if self.patch_size:
      b = bits[shape_id, cell] * valid[..., None]  # shapes touch disjoint patches: a sum places them
      per_colour = 2 ** (self.patch_size ** 2) - 1
      codes = np.where(b > 0, colour[..., None] * per_colour + b, 0).sum(1).astype(np.int32)
      return {"caption": captions, "codes": codes}
    index = (pixels[shape_id, cell] * ((colour + 1) * valid)[..., None]).sum(1)
    image = _palette(k.palette)[index].reshape(len(indices), k.image_size, k.image_size, 3)
    return {"caption": captions, "image": image}
