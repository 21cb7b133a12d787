"""An endless compositional image–caption set: scenes of shapes, their captions, and exact evaluators.

A scene is a tuple of `Shape`s (kind, colour, size, row, col): at most one shape per 8×8 cell of a
`image_size`×`image_size` RGB image on black, centred in its cell. Scenes are a pure function of
(seed, split, index). Captions state every shape in cell order (identical shapes grouped with a count)
and, when the first two groups are single shapes, their relation:

  "two small red squares at top left and bottom right; a large blue circle at top right."
  "a large red circle at top right; a small blue cross at bottom left; the red circle is above and
   right of the blue cross."

Exact evaluators: `parse_caption(text)` reads a caption back into its scene and `detect(image)` reads an
image back into its scene (None if any pixel is not part of a rendered shape), so captioning and
generation accuracy are exact comparisons of scenes.

Discrete image form: one code per p×p patch (p = `data.patch_size`): 0 for background, else
1 + (colour index)·(2^(p²) − 1) + (mask − 1), with `mask` the patch's p² pixel bits. Shapes stay inside
their cells and cells are multiples of p, so a patch holds at most one colour and the codes are lossless.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
import zlib

import numpy as np

from moma.data import draws

KINDS = ("square", "circle", "triangle", "cross")
SIZES = {"small": 3, "large": 5}
COLOURS = {"red": (230, 25, 75), "green": (60, 180, 75), "blue": (0, 130, 200),
           "yellow": (255, 225, 25), "purple": (145, 30, 180), "orange": (245, 130, 48),
           "cyan": (70, 240, 240), "white": (255, 255, 255), "pink": (240, 50, 230),
           "brown": (170, 110, 40)}
CELL = 8  # pixels per grid cell: a large shape (5) plus a margin that keeps neighbours apart
ROWS = {2: ("top", "bottom"), 3: ("top", "middle", "bottom"), 4: ("top", "upper", "lower", "bottom")}
COLS = {2: ("left", "right"), 3: ("left", "centre", "right"), 4: ("far left", "left", "right", "far right")}
COUNTS = ("a", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
          "twelve", "thirteen", "fourteen", "fifteen", "sixteen")
KNOBS = dict(image_size=16, min_objects=1, max_objects=3, palette=6, seed=0)


class Shape(typing.NamedTuple):
  kind: str
  colour: str
  size: str
  row: int
  col: int


@dataclasses.dataclass(frozen=True)
class Knobs:
  """Validated difficulty knobs (`validate(config.data.shapes)`); grid = cells a side."""

  image_size: int
  min_objects: int
  max_objects: int
  palette: int
  seed: int
  grid: int


def default_knobs():
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(KNOBS)


def validate(knobs, field: str = "data.shapes") -> Knobs:
  """The checked knobs of a config (or `Knobs`, returned as is). ValueError naming the field."""
  if isinstance(knobs, Knobs):
    return knobs
  unknown = sorted(set(knobs) - set(KNOBS))
  if unknown:
    raise ValueError(f"{field}.{unknown[0]} is not a scene attribute; use one of {sorted(KNOBS)}.")
  values = {k: knobs[k] for k in KNOBS}
  size = values["image_size"]
  if size % CELL or not 2 * CELL <= size <= 4 * CELL:
    raise ValueError(f"{field}.image_size={size}: use 16, 24 or 32 (a grid of {CELL}-pixel cells, 2 to 4 "
                     "a side).")
  grid = size // CELL
  if not 1 <= values["min_objects"] <= values["max_objects"] <= grid * grid:
    raise ValueError(f"{field}.min_objects={values['min_objects']}, max_objects="
                     f"{values['max_objects']}: need 1 <= min_objects <= max_objects <= {grid * grid} "
                     f"(cells of a {size}-pixel image).")
  if not 1 <= values["palette"] <= len(COLOURS):
    raise ValueError(f"{field}.palette={values['palette']}: use 1..{len(COLOURS)} colours.")
  return Knobs(grid=grid, **values)


def num_codes(knobs, patch_size: int) -> int:
  """Discrete image codes a scene needs at this patch size (background + colour × non-empty mask)."""
  return 1 + validate(knobs).palette * (2 ** (patch_size * patch_size) - 1)


def random_scene(knobs, u) -> tuple[Shape, ...]:
  """A scene of min..max_objects shapes in distinct cells from `scene_draws(knobs)` uniforms `u`; half the
  time a shape repeats the previous shape's kind, colour and size, so captions hold counts."""
  k = validate(knobs)
  n = k.min_objects + int(u[0] * (k.max_objects - k.min_objects + 1))
  cell_draws = u[1:1 + k.grid * k.grid]
  cells = sorted(sorted(range(len(cell_draws)), key=cell_draws.__getitem__)[:n])
  shapes = []
  for i, cell in enumerate(cells):
    repeat, kind, colour, size = u[1 + k.grid * k.grid + 4 * i:][:4]
    if shapes and repeat < 0.5:
      attributes = shapes[-1][:3]
    else:
      attributes = (KINDS[int(kind * len(KINDS))], _COLOUR_NAMES[int(colour * k.palette)],
                    _SIZE_NAMES[int(size * len(SIZES))])
    shapes.append(Shape(*attributes, cell // k.grid, cell % k.grid))
  return tuple(shapes)


def scene_draws(knobs) -> int:
  """Uniform draws `random_scene` reads."""
  k = validate(knobs)
  return 1 + k.grid * k.grid + 4 * k.max_objects


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


_COLOUR_NAMES, _SIZE_NAMES = tuple(COLOURS), tuple(SIZES)
_MASKS = {(kind, size): _mask(kind, side) for kind in KINDS for size, side in SIZES.items()}
_BY_MASK = {(m.shape, m.tobytes()): key for key, m in _MASKS.items()}


def _origin(shape: Shape) -> tuple[int, int]:
  h, w = _MASKS[shape.kind, shape.size].shape
  return shape.row * CELL + (CELL - h) // 2, shape.col * CELL + (CELL - w) // 2


@functools.lru_cache(maxsize=64)
def _sprites(image_size: int, patch_size: int) -> dict:
  """(kind, size, row, col) → (flat pixel indices, flat indices of the patches it touches, their bits)
  of a shape drawn in that cell."""
  grid, p = image_size // CELL, patch_size
  sprites = {}
  for (kind, size), mask in _MASKS.items():
    for row in range(grid):
      for col in range(grid):
        y, x = _origin(Shape(kind, "", size, row, col))
        full = np.zeros((image_size, image_size), bool)
        full[y:y + mask.shape[0], x:x + mask.shape[1]] = mask
        bits = full.reshape(image_size // p, p, image_size // p, p).transpose(0, 2, 1, 3)
        bits = (bits.reshape(-1, p * p) * (1 << np.arange(p * p))).sum(-1)
        sprites[kind, size, row, col] = (np.flatnonzero(full), np.flatnonzero(bits), bits[bits > 0])
  return sprites


@functools.lru_cache(maxsize=16)
def _palette(palette: int) -> np.ndarray:
  """uint8 [palette + 1, 3]: black background, then the scene colours."""
  return np.array([(0, 0, 0)] + list(COLOURS.values())[:palette], np.uint8)


def _check(scene, k: Knobs) -> None:
  cells = set()
  for i, shape in enumerate(scene):
    for field, value, known in (("kind", shape.kind, KINDS), ("colour", shape.colour,
                                                             _COLOUR_NAMES[:k.palette]),
                                ("size", shape.size, _SIZE_NAMES), ("row", shape.row, range(k.grid)),
                                ("col", shape.col, range(k.grid))):
      if value not in known:
        raise ValueError(f"scene shape {i}: {field}={value!r} is unknown; choose one of {tuple(known)}.")
    if (shape.row, shape.col) in cells:
      raise ValueError(f"scene shape {i}: cell ({shape.row}, {shape.col}) holds two shapes.")
    cells.add((shape.row, shape.col))


def render(scene, knobs, patch_size: int = 0):
  """Scene → uint8 RGB image [image_size, image_size, 3]; with `patch_size`, also its discrete codes."""
  k = validate(knobs)
  _check(scene, k)
  return _draw(scene, k, patch_size)


def _draw(scene, k: Knobs, patch_size: int):
  sprites = _sprites(k.image_size, patch_size or 1)
  index = np.zeros(k.image_size * k.image_size, np.int32)
  codes = np.zeros((k.image_size // (patch_size or 1)) ** 2, np.int32)
  per_colour = 2 ** (patch_size * patch_size) - 1
  for shape in scene:
    pixels, patches, bits = sprites[shape.kind, shape.size, shape.row, shape.col]
    colour = _COLOUR_NAMES.index(shape.colour)
    index[pixels] = colour + 1
    codes[patches] = colour * per_colour + bits  # 1 + colour·(2^(p²) − 1) + (bits − 1)
  image = _palette(k.palette)[index].reshape(k.image_size, k.image_size, 3)
  return (image, codes) if patch_size else image


def detect(image: np.ndarray, knobs) -> tuple[Shape, ...] | None:
  """Image → its scene (shapes in cell order), or None unless every non-black pixel belongs to a shape
  drawn exactly where `render` draws it."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  k = validate(knobs)
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
      row, col = box[0].start // CELL, box[1].start // CELL
      shape = Shape(key[0], _COLOUR_NAMES[colour_id - 1], key[1], row, col)
      if row >= k.grid or col >= k.grid or _origin(shape) != (box[0].start, box[1].start):
        return None
      shapes.append(shape)
  shapes.sort(key=lambda s: (s.row, s.col))
  cells = [(s.row, s.col) for s in shapes]
  return tuple(shapes) if len(set(cells)) == len(cells) else None


def decode_codes(codes, knobs, patch_size: int) -> np.ndarray:
  """Discrete codes → RGB image; codes past `num_codes` (e.g. from a sampled image) decode as
  background."""
  k = validate(knobs)
  p, s = patch_size, k.image_size
  per_colour = 2 ** (p * p) - 1
  codes = np.asarray(codes, np.int64).reshape(-1)
  codes = np.where(codes < num_codes(k, p), codes, 0)
  colour = np.where(codes > 0, (codes - 1) // per_colour + 1, 0)
  bits = np.where(codes > 0, (codes - 1) % per_colour + 1, 0)
  on = (bits[:, None] >> np.arange(p * p)) & 1
  index = (on * colour[:, None]).reshape(s // p, s // p, p, p).transpose(0, 2, 1, 3).reshape(s, s)
  return _palette(k.palette)[index]


def _join(items: list[str]) -> str:
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _relation(a: Shape, b: Shape) -> str:
  vertical = "above" if a.row < b.row else "below" if a.row > b.row else ""
  horizontal = "left of" if a.col < b.col else "right of" if a.col > b.col else ""
  return " and ".join(r for r in (vertical, horizontal) if r)


def _groups(scene) -> list[list[Shape]]:
  """Shapes of a cell-ordered scene grouped by (kind, colour, size), in order of first appearance."""
  groups = {}
  for shape in scene:
    groups.setdefault(shape[:3], []).append(shape)
  return list(groups.values())


def caption(scene, knobs) -> str:
  """Scene → caption (shapes grouped by kind, colour and size, in cell order)."""
  k = validate(knobs)
  _check(scene, k)
  return _caption(sorted(scene, key=lambda s: (s.row, s.col)), k)


def _caption(scene, k: Knobs) -> str:
  rows, cols = ROWS[k.grid], COLS[k.grid]
  groups = _groups(scene)
  phrases = []
  for group in groups:
    kind, colour, size = group[0][:3]
    plural = "s" if len(group) > 1 else ""
    phrases.append(f"{COUNTS[len(group) - 1]} {size} {colour} {kind}{plural} at "
                   f"{_join([f'{rows[s.row]} {cols[s.col]}' for s in group])}")
  if len(groups) > 1 and len(groups[0]) == len(groups[1]) == 1:
    a, b = groups[0][0], groups[1][0]
    phrases.append(f"the {a.colour} {a.kind} is {_relation(a, b)} the {b.colour} {b.kind}")
  return "; ".join(phrases) + "."


def max_caption_bytes(knobs) -> int:
  """The longest caption in bytes: max_objects single shapes (a group of equal shapes is shorter than
  as many single ones) with the longest names, plus the relation."""
  k = validate(knobs)
  grid = k.grid
  longest = lambda names: max(len(n) for n in names)  # pylint: disable=unnecessary-lambda-assignment
  name = longest(_COLOUR_NAMES[:k.palette]) + 1 + longest(KINDS)
  shape = len("a ") + longest(SIZES) + 1 + name + len(" at ") + longest(ROWS[grid]) + 1 + longest(COLS[grid])
  n = k.max_objects
  relation = len("; the ") + name + len(" is above and right of the ") + name if n > 1 else 0
  return n * shape + (n - 1) * len("; ") + relation + len(".")


def parse_caption(text: str, knobs) -> tuple[Shape, ...]:
  """Caption → scene (shapes in cell order). ValueError if it is not a caption of this grammar, names an
  unknown colour, kind, size or position, repeats a cell, or states a relation the positions deny."""
  k = validate(knobs)
  grid, colours = k.grid, _COLOUR_NAMES[:k.palette]
  positions = {f"{r} {c}": (i, j) for i, r in enumerate(ROWS[grid]) for j, c in enumerate(COLS[grid])}
  if not text.endswith("."):
    raise ValueError(f"caption {text!r} does not end with '.'")
  shapes, relation = [], None
  for phrase in text[:-1].split("; "):
    words = phrase.split(" ", 4)
    if words[0] == "the":
      relation = phrase
      continue
    if len(words) != 5 or words[0] not in COUNTS or not words[4].startswith("at "):
      raise ValueError(f"caption phrase {phrase!r} is not '<count> <size> <colour> <kind> at <places>'")
    count, size, colour, kind, places = COUNTS.index(words[0]) + 1, *words[1:4], words[4][len("at "):]
    if count > 1:
      if not kind.endswith("s"):
        raise ValueError(f"caption phrase {phrase!r}: plural count with a singular kind")
      kind = kind[:-1]
    cells = re.split(r", | and ", places)
    if len(cells) != count:
      raise ValueError(f"caption phrase {phrase!r}: {count} shapes but {len(cells)} places")
    for value, known, field in ((size, SIZES, "size"), (colour, colours, "colour"), (kind, KINDS, "kind")):
      if value not in known:
        raise ValueError(f"caption phrase {phrase!r}: {field} {value!r} is unknown")
    for place in cells:
      if place not in positions:
        raise ValueError(f"caption phrase {phrase!r}: place {place!r} is unknown")
      shapes.append(Shape(kind, colour, size, *positions[place]))
  scene = tuple(sorted(shapes, key=lambda s: (s.row, s.col)))
  _check(scene, k)
  if relation is not None:
    groups = _groups(scene)
    if len(groups) < 2 or len(groups[0]) != 1 or len(groups[1]) != 1 or relation != (
        f"the {groups[0][0].colour} {groups[0][0].kind} is {_relation(groups[0][0], groups[1][0])} "
        f"the {groups[1][0].colour} {groups[1][0].kind}"):
      raise ValueError(f"caption relation {relation!r} does not hold for the shapes it names")
  return scene


def features(knobs) -> dict:
  """TFDS feature specs of an example (what `moma.data.sources` reads)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  size = validate(knobs).image_size
  return {"image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
          "caption": tfds.features.Text(), "codes": tfds.features.Tensor(shape=(None,), dtype=np.int32)}


@functools.lru_cache(maxsize=64)
def _sprite_tables(image_size: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Dense `_sprites`: pixel masks bool [kind·size, cell, S²] and patch bits int64 [kind·size, cell, P]
  (0 where the shape does not touch the patch), kind·size = kind index · len(SIZES) + size index."""
  grid, s, p = image_size // CELL, image_size, patch_size
  pixels = np.zeros((len(KINDS) * len(SIZES), grid * grid, s * s), bool)
  bits = np.zeros((len(KINDS) * len(SIZES), grid * grid, (s // p) ** 2), np.int64)
  for (kind, size, row, col), (pixel_ids, patch_ids, patch_bits) in _sprites(s, p).items():
    shape = KINDS.index(kind) * len(SIZES) + _SIZE_NAMES.index(size)
    pixels[shape, row * grid + col, pixel_ids] = True
    bits[shape, row * grid + col, patch_ids] = patch_bits
  return pixels, bits


def _scene_block(k: Knobs, u: np.ndarray):
  """`random_scene` over rows of draws u [n, scene_draws]: (valid bool [n, m], cell, kind, colour and
  size ids int [n, m]) for m = max_objects slots in cell order; bit-identical to the per-scene loop."""
  n, g2, m = len(u), k.grid * k.grid, k.max_objects
  count = k.min_objects + (u[:, 0] * (m - k.min_objects + 1)).astype(np.int64)
  order = np.argsort(u[:, 1:1 + g2], axis=1, kind="stable")  # Python's sort is stable too
  rank = np.empty_like(order)
  np.put_along_axis(rank, order, np.arange(g2)[None].repeat(n, 0), axis=1)
  chosen = np.where(rank < count[:, None], np.arange(g2), g2)  # the `count` lowest draws' cells
  cell = np.sort(chosen, axis=1)[:, :m]
  valid = np.arange(m) < count[:, None]
  repeat, kind, colour, size = np.moveaxis(u[:, 1 + g2:1 + g2 + 4 * m].reshape(n, m, 4), 2, 0)
  slot = np.arange(m)[None]
  source = np.maximum.accumulate(np.where((slot == 0) | (repeat >= 0.5), slot, 0), axis=1)
  pick = lambda x, choices: np.take_along_axis((x * choices).astype(np.int64), source, 1)  # pylint: disable=unnecessary-lambda-assignment
  return valid, cell, pick(kind, len(KINDS)), pick(colour, k.palette), pick(size, len(SIZES))


class Examples:
  """Random access to scenes {"image", "caption", "codes"} of one split, a pure function of
  (seed, split, index); "codes" are the discrete codes at `patch_size`. `block(indices)` renders many
  scenes at once with numpy (what the packer uses); `examples[i]` is its per-scene reference."""

  def __init__(self, knobs, split: str, patch_size: int):
    self.knobs, self.patch_size = validate(knobs), patch_size
    self.split_id, self.num_draws = zlib.crc32(split.encode()), scene_draws(knobs)

  def __len__(self) -> int:
    return 2**31 - 1

  def _key(self, index: int) -> str:
    return f"shapes/{self.knobs.seed}/{self.split_id}/{index}"

  def __getitem__(self, index: int) -> dict:
    k = self.knobs
    scene = random_scene(k, draws.uniforms(self._key(index), self.num_draws))
    drawn = _draw(scene, k, self.patch_size)
    image, codes = drawn if self.patch_size else (drawn, None)
    return {"image": image, "caption": _caption(scene, k), "codes": codes}

  def block(self, indices) -> dict:
    """`[self[i] for i in indices]` as columns: "caption" (list of str) and, with a patch size, "codes"
    int32 [n, P], else "image" uint8 [n, S, S, 3] (each path renders only the image form it feeds)."""
    k = self.knobs
    valid, cell, kind, colour, size = _scene_block(
        k, draws.uniforms_block([self._key(i) for i in indices], self.num_draws))
    shape_id = kind * len(SIZES) + size
    pixels, bits = _sprite_tables(k.image_size, self.patch_size or 1)
    rows, cols = np.divmod(cell, k.grid)
    captions = [_caption([Shape(KINDS[t], _COLOUR_NAMES[c], _SIZE_NAMES[z], r, q)
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
