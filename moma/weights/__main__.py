"""CLI: `python -m moma.weights import --hf=DIR --workdir=RUN [--dtype=float32|bfloat16]` and
`python -m moma.weights export --workdir=RUN --hf=DIR` (docs/weights.md)."""

from moma import cli


def main():
  parser = cli.ArgumentParser(prog="python -m moma.weights", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  read = commands.add_parser("import", help="a Hugging Face model directory → a moma run at step 0")
  read.add_argument("--hf", required=True, help="the HF directory (config.json, *.safetensors, tokenizer)")
  read.add_argument("--workdir", required=True, help="the new run directory")
  read.add_argument("--dtype", default="float32", help="float32 | bfloat16: the run's params and compute")
  write = commands.add_parser("export", help="a dense or Mamba moma run → a Hugging Face model directory")
  write.add_argument("--workdir", required=True, help="the run (its latest checkpoint)")
  write.add_argument("--hf", required=True, help="the new HF directory")
  args = parser.parse_args()
  from moma import weights  # pylint: disable=g-import-not-at-top (jax is heavy; --help stays fast)
  if args.command == "import":
    print(weights.import_hf(args.hf, args.workdir, args.dtype))
  else:
    print(weights.export_hf(args.workdir, args.hf))


if __name__ == "__main__":
  cli.run_argparse(main)
