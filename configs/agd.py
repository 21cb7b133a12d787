"""IMP-style Alternating Gradient Descent over six tasks on one MoT backbone (moma/agd.py).

`configs/agd.py:size=tiny,untie=all,schedule=sample`. Tasks (each with its own shapes and compiled step):

  lm              mixed-modal next-token LM over the whole embedded mixture, 320-token rows;
  captioning      digit image → caption, 128-token rows;
  image_gen       caption → 8×8 digit image, 128-token rows;
  audio_text      DTMF tone → caption, 192-token rows;
  digits8         encoder: classify 8×8 digits (64 image tokens);
  clip16          encoder: image–text contrastive on digits upsampled to 16×16 (256 image tokens).

Run: `python -m moma.main --config=configs/agd.py:size=tiny --workdir=runs/agd`.
"""

from configs import common
from configs import mot
from moma import agd

# Per-size batch sizes: (decoder rows, encoder examples).
BATCH = {"tiny": (4, 16), "small": (16, 64), "S": (32, 256), "M": (64, 512), "1.4B": (128, 1024), "7B": (512, 4096)}


def get_config(arg=None):
  args = common.parse_arg(arg, size="tiny", untie="all", schedule="sample")
  config = common.base_config(args.size)
  config.model.untie = mot.untie_components(args.untie, config.model)
  rows, examples = BATCH[args.size]
  task = agd.task_config
  config.agd = dict(schedule=args.schedule, num_classes=10, tasks=dict(
      lm=task("lm", tuple(config.data.mixture), batch_size=rows, seq_len=320),
      captioning=task("captioning", ("image_caption",), batch_size=2 * rows, seq_len=128),
      image_gen=task("image_generation", ("caption_image",), batch_size=2 * rows, seq_len=128),
      audio_text=task("audio_text", ("audio_caption",), batch_size=2 * rows, seq_len=192),
      digits8=task("classification", ("image_caption",), batch_size=examples, image_size=8),
      clip16=task("contrastive", ("image_caption",), batch_size=examples, image_size=16, seq_len=48,
                  weight=2.0),
  ))
  config.model.max_seq_len = max(config.model.max_seq_len, 320)
  return config
