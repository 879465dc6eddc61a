"""The `longctx` command line.

    longctx train RECIPE.py [--run-dir DIR] [--set key=value ...] [--dry-run]
    longctx eval RUN_DIR [--max-batches N]
    longctx models
    longctx tokenizer train --input FILE [FILE ...] --vocab-size N --out PREFIX
    longctx bench [--d-models 128,256,512] [--seg-lens 512,2048]

Errors caused by input end in one line `error: ...` and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

from longctx.errors import LongctxError

EXAMPLES = """examples:
  longctx train recipes/quickstart.py --run-dir runs/quickstart
  longctx train recipes/quickstart.py --set model.d_model=256 --set train.steps=500
  longctx train recipes/pg19_transformer_pod.py --dry-run
  longctx eval runs/quickstart
  longctx tokenizer train --input books/*.txt --vocab-size 8000 --out tok/pg19
"""


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="longctx", description="Long-context language models in JAX: train, evaluate, benchmark.",
      epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", metavar="COMMAND")

  t = sub.add_parser("train", help="train a recipe (resumes from the run dir's latest checkpoint)",
                     description="Train the model a recipe file describes. If RUN_DIR already holds checkpoints, "
                     "training resumes from the latest one, restoring parameters, optimizer state, every "
                     "lane's model state and the data position.")
  t.add_argument("recipe", help="a recipe file defining config() -> longctx.config.Config, e.g. recipes/quickstart.py")
  t.add_argument("--run-dir", default=None,
                 help="where checkpoints, metrics.jsonl, TensorBoard events and loss.png go "
                 "(default: runs/<recipe name>)")
  t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config field, e.g. --set model.d_model=256 --set data.paths=[a.txt,b.txt]; "
                 "repeatable; an unknown key or a wrong type is an error that lists the valid keys")
  t.add_argument("--dry-run", action="store_true",
                 help="build the config and mesh and print model size, FLOPs per token, mesh and per-device "
                 "memory estimate; train nothing, write nothing")
  t.add_argument("--stop-at-step", type=int, default=None,
                 help="end this run with a checkpoint after this step (as a preempted job would); "
                 "rerun the same command to continue")
  t.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")

  e = sub.add_parser("eval", help="evaluate a trained run on its held-out documents",
                     description="Restore the latest checkpoint of RUN_DIR and stream every held-out document "
                     "through fresh lane states; print loss, bits per token and perplexity.")
  e.add_argument("run_dir", help="a run directory written by `longctx train`")
  e.add_argument("--max-batches", type=int, default=0, help="stop after this many batches (0 = all documents)")
  e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override data fields for evaluation, e.g. --set data.eval_paths=[held_out.txt]")

  sub.add_parser("models", help="list every registered model with a one-line description",
                 description="List every registered model with a one-line description.")

  tok = sub.add_parser("tokenizer", help="tokenizer tools", description="Tokenizer tools.")
  tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND")
  tt = tok_sub.add_parser("train", help="train a sentencepiece model from text files",
                          description="Train a sentencepiece tokenizer from .txt/.jsonl/.parquet files; writes "
                          "PREFIX.model and PREFIX.vocab. Use it with --set data.tokenizer=PREFIX.model.")
  tt.add_argument("--input", nargs="+", required=True, help="training text files (.txt, .jsonl, .parquet)")
  tt.add_argument("--vocab-size", type=int, default=8000, help="vocabulary size (default 8000)")
  tt.add_argument("--out", required=True, help="output prefix: writes OUT.model and OUT.vocab")
  tt.add_argument("--model-type", default="unigram", choices=("unigram", "bpe"), help="sentencepiece algorithm")
  tt.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet (default text)")

  b = sub.add_parser("bench", help="measure train throughput, FLOPs, MFU and memory",
                     description="Benchmark the train step per model size and segment length: tokens/s, "
                     "FLOPs per token, MFU against a matmul peak measured in the same process, compiled memory "
                     "and peak RSS, with ratios against the first configuration.")
  b.add_argument("--model", default="transformer", help="registered model name (default transformer)")
  b.add_argument("--d-models", default="128,256,512", help="comma-separated d_model values")
  b.add_argument("--seg-lens", default="512,2048", help="comma-separated segment lengths")
  b.add_argument("--tokens-per-step", type=int, default=8192, help="lanes x seg_len per step (default 8192)")
  b.add_argument("--layers", type=int, default=4, help="layers per model (default 4)")
  b.add_argument("--window", type=int, default=256, help="attention window (default 256)")
  b.add_argument("--steps", type=int, default=5, help="timed steps per configuration (default 5)")
  b.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
  b.add_argument("--json", default=None, help="also write the results to this JSON file")
  return p


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help()
    return 0
  try:
    if args.command == "train":
      return _train(args)
    if args.command == "eval":
      return _eval(args)
    if args.command == "models":
      from longctx.models import list_models

      for name, description in list_models().items():
        print(f"{name:<16} {description}")
      return 0
    if args.command == "tokenizer":
      if args.tokenizer_command != "train":
        parser.parse_args(["tokenizer", "--help"])
      from longctx.data.tokenizers import train_sentencepiece

      path = train_sentencepiece(args.input, model_prefix=args.out, vocab_size=args.vocab_size,
                                 model_type=args.model_type, text_field=args.text_field)
      print(f"wrote {path}; use it with --set data.tokenizer={path}")
      return 0
    if args.command == "bench":
      from longctx.bench import run_bench_cli

      return run_bench_cli(args)
  except LongctxError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  return 0


def _train(args) -> int:
  from longctx import config as config_lib

  cfg = config_lib.apply_overrides(config_lib.load_recipe(args.recipe), args.overrides).validate()
  if args.dry_run:
    from longctx.estimate import estimate_run

    print(f"recipe {args.recipe}: model {cfg.model.name}")
    for line in estimate_run(cfg).lines():
      print(line)
    return 0
  from longctx.training.loop import run_training

  run_dir = args.run_dir or os.path.join("runs", pathlib.Path(args.recipe).stem)
  summary = run_training(cfg, run_dir, stop_at_step=args.stop_at_step, progress=not args.no_progress)
  if summary["end_step"] < cfg.train.steps:
    print(f"stopped at step {summary['end_step']}; rerun the same command to resume from it")
  print(f"run dir: {run_dir} (metrics.jsonl, tensorboard/, loss.png, checkpoints/)")
  return 0


def _eval(args) -> int:
  from longctx import config as config_lib
  from longctx.errors import CheckpointError
  from longctx.training.checkpoint import Checkpointer
  from longctx.training.loop import build_pipeline, evaluate
  from longctx.training.trainer import Trainer

  run_dir = pathlib.Path(args.run_dir)
  cfg_path = run_dir / "config.json"
  if not cfg_path.is_file():
    raise CheckpointError(f"{cfg_path} not found; pass a run directory written by `longctx train`")
  cfg = config_lib.apply_overrides(config_lib.from_dict(json.loads(cfg_path.read_text())), args.overrides)
  cfg.validate()
  pipeline = build_pipeline(cfg)
  trainer = Trainer(cfg)
  ckpt = Checkpointer(run_dir / "checkpoints", create=False)
  step = ckpt.latest_step()
  if step is None:
    raise CheckpointError(f"no checkpoint in {run_dir / 'checkpoints'}; train first")
  ts, _ = ckpt.restore(step, trainer.abstract_train_state_sharded())
  ckpt.close()
  metrics = evaluate(trainer, pipeline, ts["params"], max_batches=args.max_batches)
  print(f"eval @ step {step}: loss {metrics['loss']:.4f} | bits/token {metrics['bits_per_token']:.4f} | "
        f"ppl {metrics['perplexity']:.2f} | {int(metrics['tokens'])} held-out tokens")
  return 0


if __name__ == "__main__":
  sys.exit(main())
