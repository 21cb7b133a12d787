"""An endless set of captioned melodies: audio whose content the caption states, so it can be learned.

A melody is 2..max_notes notes of one timbre (sine, square or triangle wave), each a pitch of the C major
scale (c3..b3 at `SAMPLE_RATE`) held short (16 samples) or long (32), every note starting at phase 0. The
caption states timbre, pitches and rhythm ("a square melody: c long, e short, g short."), which determines
the waveform. Low pitches at a low rate make consecutive samples close, so a small model predicts the
next μ-law code from the last ones well below the uniform loss. Melodies are a pure function of
(seed, split, index); `parse_caption` reads a caption back into its melody.
"""

from __future__ import annotations

import collections
import zlib

import numpy as np

from moma.data import draws

SAMPLE_RATE = 2000  # Hz: 8 to 15 samples per period of the c3..b3 notes
PITCHES = {"c": 130.81, "d": 146.83, "e": 164.81, "f": 174.61, "g": 196.0, "a": 220.0, "b": 246.94}
DURATIONS = {"short": 16, "long": 32}  # samples
TIMBRES = ("sine", "square", "triangle")
LEVEL = 0.7
KNOBS = dict(max_notes=4, seed=0)
_Knobs = collections.namedtuple("_Knobs", tuple(KNOBS))


def default_knobs():
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(KNOBS)


def validate(knobs, field: str = "data.melodies") -> None:
  unknown = sorted(set(knobs) - set(KNOBS))
  if unknown:
    raise ValueError(f"{field}.{unknown[0]} is not a melody attribute; known: {sorted(KNOBS)}.")
  if not 2 <= knobs.max_notes <= 8:
    raise ValueError(f"{field}.max_notes={knobs.max_notes}: use 2..8 notes.")


def random_melody(knobs, u) -> tuple[str, tuple[tuple[str, str], ...]]:
  """(timbre, ((pitch, duration), ...)) from `melody_draws(knobs)` uniforms `u`."""
  n = 2 + int(u[0] * (knobs.max_notes - 1))
  notes = tuple((_PITCH_NAMES[int(p * len(PITCHES))], _DURATION_NAMES[int(d * len(DURATIONS))])
                for p, d in zip(u[2:2 + n], u[2 + knobs.max_notes:2 + knobs.max_notes + n]))
  return TIMBRES[int(u[1] * len(TIMBRES))], notes


def melody_draws(knobs) -> int:
  return 2 + 2 * knobs.max_notes


def _note(timbre: str, pitch: str, duration: str) -> np.ndarray:
  phase = (np.arange(DURATIONS[duration]) * PITCHES[pitch] / SAMPLE_RATE) % 1.0
  if timbre == "sine":
    wave = np.sin(2 * np.pi * phase)
  elif timbre == "square":
    wave = np.where(phase < 0.5, 1.0, -1.0)
  else:
    wave = 1.0 - 4.0 * np.abs(phase - 0.5)
  return (LEVEL * wave).astype(np.float32)


_PITCH_NAMES, _DURATION_NAMES = tuple(PITCHES), tuple(DURATIONS)
_NOTES = {(t, p, d): _note(t, p, d) for t in TIMBRES for p in PITCHES for d in DURATIONS}


def render(melody) -> np.ndarray:
  """Melody → float32 waveform in [-1, 1] at SAMPLE_RATE (every note starts at phase 0)."""
  timbre, notes = melody
  return np.concatenate([_NOTES[timbre, pitch, duration] for pitch, duration in notes])


def max_samples(knobs) -> int:
  return knobs.max_notes * max(DURATIONS.values())


def caption(melody) -> str:
  timbre, notes = melody
  return f"a {timbre} melody: " + ", ".join(f"{p} {d}" for p, d in notes) + "."


def max_caption_bytes(knobs) -> int:
  return len(caption(("triangle", (("c", "short"),) * knobs.max_notes)))


def parse_caption(text: str):
  """Caption → melody; ValueError if it does not follow the grammar."""
  head, sep, body = text.partition(" melody: ")
  timbre = head[len("a "):]
  if not (sep and head.startswith("a ") and timbre in TIMBRES and body.endswith(".")):
    raise ValueError(f"caption {text!r} is not 'a <timbre> melody: <pitch> <duration>, ....'")
  notes = []
  for item in body[:-1].split(", "):
    pitch, _, duration = item.partition(" ")
    if pitch not in PITCHES or duration not in DURATIONS:
      raise ValueError(f"caption note {item!r}: pitch or duration unknown")
    notes.append((pitch, duration))
  return timbre, tuple(notes)


def features(knobs) -> dict:
  """TFDS feature specs of an example (what `moma.data.sources` reads)."""
  del knobs
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return {"audio": tfds.features.Tensor(shape=(None,), dtype=np.float32), "caption": tfds.features.Text()}


class Examples:
  """Random access to melodies {"audio", "caption"} of one split: a pure function of (seed, split, i)."""

  def __init__(self, knobs, split: str):
    validate(knobs)
    self.knobs = _Knobs(**{k: knobs[k] for k in KNOBS})
    self.split_id, self.num_draws = zlib.crc32(split.encode()), melody_draws(self.knobs)

  def __len__(self) -> int:
    return 2**31 - 1

  def _key(self, index: int) -> str:
    return f"melodies/{self.knobs.seed}/{self.split_id}/{index}"

  def __getitem__(self, index: int) -> dict:
    melody = random_melody(self.knobs, draws.uniforms(self._key(index), self.num_draws))
    return {"audio": render(melody), "caption": caption(melody)}

  def block(self, indices) -> dict:
    """`[self[i] for i in indices]` as columns "audio" and "caption" (lists), the draws read with numpy
    (what the packer uses; `examples[i]` is its per-melody reference)."""
    m = self.knobs.max_notes
    u = draws.uniforms_block([self._key(i) for i in indices], self.num_draws)
    count = 2 + (u[:, 0] * (m - 1)).astype(np.int64)
    timbre = (u[:, 1] * len(TIMBRES)).astype(np.int64)
    pitch = (u[:, 2:2 + m] * len(PITCHES)).astype(np.int64)
    duration = (u[:, 2 + m:2 + 2 * m] * len(DURATIONS)).astype(np.int64)
    melodies = [(TIMBRES[t], tuple((_PITCH_NAMES[p], _DURATION_NAMES[d]) for p, d in zip(ps[:n], ds[:n])))
                for t, n, ps, ds in zip(timbre.tolist(), count.tolist(), pitch.tolist(), duration.tolist())]
    return {"audio": [render(melody) for melody in melodies], "caption": [caption(x) for x in melodies]}
