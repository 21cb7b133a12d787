"""Scenes of shapes and their captions: the scene model, random scenes, the caption grammar and its parser.

A scene is a tuple of `Shape`s (kind, colour, size, row, col): at most one shape per 8×8 cell of an
`image_size`×`image_size` image (`moma.data.shapes` draws it). Scenes are a pure function of uniform
draws (`random_scene`; `random_scenes` is its vectorised twin). Captions state every shape in cell order
(identical shapes grouped with a count) and, when the first two groups are single shapes, their relation:

  "two small red squares at top left and bottom right; a large blue circle at top right."
  "a large red circle at top right; a small blue cross at bottom left; the red circle is above and
   right of the blue cross."

`parse_caption(text)` reads a caption back into its scene, so captioning accuracy is an exact comparison
of scenes.
"""

from __future__ import annotations

import dataclasses
import re
import typing

import numpy as np

KINDS = ("square", "circle", "triangle", "cross")
SIZES = {"small": 3, "large": 5}
COLOURS = {"red": (230, 25, 75), "green": (60, 180, 75), "blue": (0, 130, 200),
           "yellow": (255, 225, 25), "purple": (145, 30, 180), "orange": (245, 130, 48),
           "cyan": (70, 240, 240), "white": (255, 255, 255), "pink": (240, 50, 230),
           "brown": (170, 110, 40)}
COLOUR_NAMES, SIZE_NAMES = tuple(COLOURS), tuple(SIZES)
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
      attributes = (KINDS[int(kind * len(KINDS))], COLOUR_NAMES[int(colour * k.palette)],
                    SIZE_NAMES[int(size * len(SIZES))])
    shapes.append(Shape(*attributes, cell // k.grid, cell % k.grid))
  return tuple(shapes)


def scene_draws(knobs) -> int:
  """Uniform draws `random_scene` reads."""
  k = validate(knobs)
  return 1 + k.grid * k.grid + 4 * k.max_objects



def check(scene, k: Knobs) -> None:
  """ValueError naming the shape and field unless every shape fits the knobs and cells are distinct."""
  cells = set()
  for i, shape in enumerate(scene):
    for field, value, known in (("kind", shape.kind, KINDS), ("colour", shape.colour,
                                                             COLOUR_NAMES[:k.palette]),
                                ("size", shape.size, SIZE_NAMES), ("row", shape.row, range(k.grid)),
                                ("col", shape.col, range(k.grid))):
      if value not in known:
        raise ValueError(f"scene shape {i}: {field}={value!r} is unknown; choose one of {tuple(known)}.")
    if (shape.row, shape.col) in cells:
      raise ValueError(f"scene shape {i}: cell ({shape.row}, {shape.col}) holds two shapes.")
    cells.add((shape.row, shape.col))


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
  check(scene, k)
  return describe(sorted(scene, key=lambda s: (s.row, s.col)), k)


def describe(scene, k: Knobs) -> str:
  """`caption` of a cell-ordered scene that is known to be valid (the data pipeline's fast path)."""
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
  name = longest(COLOUR_NAMES[:k.palette]) + 1 + longest(KINDS)
  shape = len("a ") + longest(SIZES) + 1 + name + len(" at ") + longest(ROWS[grid]) + 1 + longest(COLS[grid])
  n = k.max_objects
  relation = len("; the ") + name + len(" is above and right of the ") + name if n > 1 else 0
  return n * shape + (n - 1) * len("; ") + relation + len(".")


def parse_caption(text: str, knobs) -> tuple[Shape, ...]:
  """Caption → scene (shapes in cell order). ValueError if it is not a caption of this grammar, names an
  unknown colour, kind, size or position, repeats a cell, or states a relation the positions deny."""
  k = validate(knobs)
  grid, colours = k.grid, COLOUR_NAMES[:k.palette]
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
  check(scene, k)
  if relation is not None:
    groups = _groups(scene)
    if len(groups) < 2 or len(groups[0]) != 1 or len(groups[1]) != 1 or relation != (
        f"the {groups[0][0].colour} {groups[0][0].kind} is {_relation(groups[0][0], groups[1][0])} "
        f"the {groups[1][0].colour} {groups[1][0].kind}"):
      raise ValueError(f"caption relation {relation!r} does not hold for the shapes it names")
  return scene


def random_scenes(k: Knobs, u: np.ndarray):
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
