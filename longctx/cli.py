"""The `longctx` command line.

    longctx train RECIPE.py [--run-dir DIR] [--set key=value ...] [--dry-run] [--init-from CKPT]
                  [--distributed | --coordinator HOST:PORT --num-processes N --process-id I]
    longctx eval RUN_DIR [--task passkey,mqar,qa1,qa2,ppl --lengths 1k,4k,16k] [--compare RUN ...]
    longctx generate RUN_DIR --prompt-file F [--max-new-tokens N] [--temperature T --top-p P --top-k K --seed S]
    longctx models
    longctx tokenizer train --input FILE [FILE ...] --vocab-size N --out PREFIX
    longctx export RUN_DIR --format safetensors|hf --out DIR [--step N]
    longctx import-hf HF_DIR --out DIR
    longctx bench [--models transformer,...] [--d-models 128,256,512] [--seg-lens 512,2048]
                  [--stream-lengths 1k,16k,256k,1M]

Errors caused by input end in one line `error: ...` and exit code 2.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys

from longctx.errors import ConfigError, LongctxError

EXAMPLES = """examples:
  longctx train recipes/quickstart.py --run-dir runs/quickstart
  longctx train recipes/quickstart.py --set model.d_model=256 --set train.steps=500
  longctx train recipes/pod/transformer.py --dry-run
  longctx eval runs/quickstart
  longctx generate runs/quickstart --prompt-file prompt.txt --max-new-tokens 200 --temperature 0.8 --top-p 0.95
  longctx tokenizer train --input books/*.txt --vocab-size 8000 --out tok/pg19
"""


class _Parser(argparse.ArgumentParser):
  """argparse whose usage errors are one line like every other error (its subcommand parsers inherit this)."""

  def error(self, message: str):
    self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def _registry() -> tuple[list[str], list[str], dict[str, str]]:
  """(every registered model, those that read whole blocks, name -> transformers model_type of those with a
  Hugging Face counterpart): the help texts name them from the registry."""
  from longctx.export import hf_models
  from longctx.models import list_models, registered

  return (list(list_models()), [c.registry_name for c in registered() if not c.supports_token_decoding],
          hf_models())


def _parser() -> argparse.ArgumentParser:
  models, blockwise, hf = _registry()
  hf_names = " and ".join(hf) or "none"
  p = _Parser(
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
                 "memory estimate, then per-device memory of the train step compiled for the recipe's mesh "
                 "(on CPU with virtual devices when this host has another device count; deep models are "
                 "compiled at 6 and 8 layers and extrapolated); train nothing, write nothing")
  t.add_argument("--no-compile", action="store_true", help="with --dry-run: only the estimate, compile nothing")
  t.add_argument("--full-compile", action="store_true",
                 help="with --dry-run: compile every layer instead of extrapolating from 6 and 8 (slower)")
  t.add_argument("--tpu-topology", default=None, metavar="NAME",
                 help="with --dry-run: compile with the TPU compiler for this slice, e.g. v5p:4x4x4 (a v5p-128); "
                 "compile-only, no TPU needed, but libtpu must be installed (pip install \"jax[tpu]\")")
  t.add_argument("--stop-at-step", type=int, default=None,
                 help="end this run with a checkpoint after this step (as a preempted job would); "
                 "rerun the same command to continue")
  t.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
  t.add_argument("--init-from", default=None, metavar="CKPT",
                 help="fine-tune: start from these weights instead of a random init (a run dir, one of its "
                 "checkpoints/STEP dirs, or a dir from `longctx export --format safetensors` / `longctx import-hf`); "
                 "optimizer, step count and data start fresh, every parameter shape must match the recipe's model "
                 "(settings that change no shape, such as model.window, may differ). Same as --set "
                 "train.init_from=CKPT; ignored once RUN_DIR has checkpoints of its own (training then resumes)")
  t.add_argument("--distributed", action="store_true",
                 help="multi-host run on a TPU pod slice, SLURM or Open MPI: run this same command on every host "
                 "and JAX finds the others (jax.distributed.initialize()); the run dir must be shared by all hosts")
  t.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                 help="multi-host run on any other cluster: process 0's host and a free port, the same on every "
                 "process; needs --num-processes and --process-id (default: $LONGCTX_COORDINATOR)")
  t.add_argument("--num-processes", type=int, default=None, metavar="N",
                 help="number of processes in the run, one per host (default: $LONGCTX_NUM_PROCESSES; 1 = "
                 "single process)")
  t.add_argument("--process-id", type=int, default=None, metavar="I",
                 help="this process's id in 0..N-1; process 0 hosts the coordinator and is the only one that prints "
                 "and writes logs (default: $LONGCTX_PROCESS_ID)")

  e = sub.add_parser(
      "eval", help="evaluate a run: held-out loss, or the long-context suite (--task), or --compare runs",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Without --task: restore the latest checkpoint of RUN and stream every held-out document "
      "through fresh lane states; print loss, bits per token and perplexity.\n\n"
      "With --task: stream synthetic long-context examples (or long held-out documents for ppl) through the "
      "model state segment by segment at each --lengths, and write a table, RUN/eval/results.json and PNG "
      "plots:\n"
      "  passkey  accuracy on a depth x length grid (--depths)\n"
      "  mqar     multi-query associative recall, per-query accuracy (on a pairs x length grid with --pairs)\n"
      "  qa1/qa2  BABILong-style one / two supporting facts in filler text\n"
      "  copy     copy a code seen at the start\n"
      "  ppl      bits per token vs token position on the longest held-out documents\n"
      "An answer counts only if every one of its tokens is the greedy (argmax) prediction.\n\n"
      "With --compare RUN_A RUN_B ...: put the saved results of several runs in one table and one set of plots.",
      epilog="examples:\n"
      "  longctx eval runs/quickstart\n"
      "  longctx eval runs/recall/transformer --task passkey,mqar,qa1,qa2 --lengths 128,512,2k,8k\n"
      "  longctx eval runs/recall/transformer --task passkey --lengths 16k,1M --depths 0.5 --examples 1\n"
      "  longctx eval runs/quickstart --task ppl --lengths 1k,4k,16k --examples 8\n"
      "  longctx eval runs/recall/rmt --task reach --lengths 8,64,256,1k --examples 4\n"
      "  longctx eval --compare runs/recall/transformer runs/recall/rmt --out runs/recall/compare")
  e.add_argument("run_dir", nargs="?", default=None,
                 help="a run directory written by `longctx train`, or one of its checkpoints/STEP directories")
  e.add_argument("--task", default=None,
                 help="comma-separated tasks from passkey, mqar, qa1, qa2, copy, ppl, reach (how far back the prediction "
                 "depends on the input, forward and by gradient; --lengths are then the distances) (default: "
                 "held-out loss only)")
  e.add_argument("--lengths", default=None,
                 help="comma-separated context lengths in tokens, e.g. 128,512,2k,1M (k = 1024, M = 1024^2); "
                 "default: 1x, 4x, 16x, 64x the model's attention window (1k..64k without one)")
  e.add_argument("--examples", type=int, default=16,
                 help="examples per length (per depth / pair count); for ppl: documents; for reach: random "
                 "sequences, at most 8 (default 16)")
  e.add_argument("--depths", default=None, help="passkey key depths in [0, 1] (default 0,0.25,0.5,0.75,1)")
  e.add_argument("--pairs", default=None,
                 help="mqar key-value pair counts, e.g. 4,16,64 (default: grows with the length)")
  e.add_argument("--seg-len", type=int, default=None,
                 help="tokens fed per segment while streaming (default: the run's data.seg_len)")
  e.add_argument("--seed", type=int, default=0, help="seed of the generated examples (default 0)")
  e.add_argument("--out", default=None,
                 help="where results.json and the plots go (default RUN/eval; with --compare: "
                 "eval_compare)")
  e.add_argument("--label", default="", help="name of this run in tables and plot legends (default model@step)")
  e.add_argument("--compare", nargs="+", default=None, metavar="RUN",
                 help="compare saved results of these runs (run dirs, eval dirs or results.json files)")
  e.add_argument("--max-batches", type=int, default=0,
                 help="held-out loss only: stop after this many batches (0 = all documents)")
  e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override config fields for evaluation, e.g. --set data.eval_paths=[held_out.txt] "
                 "(the ppl task reads the run's held-out source) or --set mesh.data=1")
  e.add_argument("--no-progress", action="store_true", help="no progress bars")

  g = sub.add_parser(
      "generate", help="continue a prompt with a trained run (greedy, temperature, top-k, top-p)",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Restore a run's saved config, tokenizer and latest (or --step) checkpoint, stream the prompt "
      "file through the model state segment by segment (any length, in the memory of one segment; progress on "
      "stderr), then decode new tokens one at a time and print the continuation to stdout as it comes. The prompt "
      "is read as a document (BOS first); decoding stops at --max-new-tokens or at the end-of-document token.\n\n"
      f"Models that read whole blocks ({', '.join(blockwise)}) decode by re-running the open "
      "block from the state at its start for every new token: exact, at one block's work per token.",
      epilog="examples:\n"
      "  longctx generate runs/quickstart --prompt-file prompt.txt --max-new-tokens 200\n"
      "  longctx generate runs/quickstart --prompt-file book.txt --temperature 0.8 --top-p 0.95 --seed 1\n"
      "  echo 'def main():' | longctx generate runs/quickstart --prompt-file - --step 200")
  g.add_argument("run_dir", help="a run directory written by `longctx train`")
  g.add_argument("--prompt-file", required=True, metavar="FILE",
                 help="UTF-8 text file holding the prompt, of any length ('-' reads stdin)")
  g.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                 help="generate at most N new tokens, N >= 1 (default 256)")
  g.add_argument("--temperature", type=float, default=0.0, metavar="T",
                 help="sampling temperature; 0 = greedy, the most likely token every step (default 0)")
  g.add_argument("--top-p", type=float, default=1.0, metavar="P",
                 help="nucleus sampling: draw from the smallest set of most likely tokens whose probability "
                 "reaches P, in (0, 1] (default 1 = off; needs --temperature > 0)")
  g.add_argument("--top-k", type=int, default=0, metavar="K",
                 help="draw from the K most likely tokens only (default 0 = off; needs --temperature > 0)")
  g.add_argument("--seed", type=int, default=0, help="random seed of the sampling; the same seed gives the "
                 "same continuation (default 0)")
  g.add_argument("--step", type=int, default=None,
                 help="use the checkpoint of this training step (default: the latest)")
  g.add_argument("--seg-len", type=int, default=None,
                 help="prompt tokens fed per segment (default: the run's data.seg_len; a multiple of the "
                 "model's block length)")
  g.add_argument("--ignore-eos", action="store_true",
                 help="keep generating past the end-of-document token until --max-new-tokens")
  g.add_argument("--no-progress", action="store_true", help="no progress bar for the prompt")

  sub.add_parser("models", help="list every registered model with a one-line description",
                 description="List every registered model with a one-line description.")

  tok = sub.add_parser("tokenizer", help="tokenizer tools", description="Tokenizer tools.")
  tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND")
  tt = tok_sub.add_parser("train", help="train a sentencepiece model from text files",
                          description="Train a sentencepiece tokenizer from text files; writes PREFIX.model and "
                          "PREFIX.vocab. Use it with --set data.tokenizer=PREFIX.model. It is lossless, as Llama's "
                          "and Gemma's are: no Unicode normalisation, whitespace, indentation and newlines kept, "
                          "digits split, and byte fallback for characters never seen in training, so "
                          "decode(encode(text)) == text for any UTF-8 text.")
  tt.add_argument("--input", nargs="+", required=True,
                  help="training text files or glob patterns: .jsonl/.json/.parquet rows (--text-field), any other "
                  "file (.txt, .tex, .md, .py, ...) one document; also .gz/.bz2/.xz/.zst compressed")
  tt.add_argument("--vocab-size", type=int, default=8000, help="vocabulary size (default 8000)")
  tt.add_argument("--out", required=True, help="output prefix: writes OUT.model and OUT.vocab")
  tt.add_argument("--model-type", default="unigram", choices=("unigram", "bpe"), help="sentencepiece algorithm")
  tt.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet (default text)")
  tt.add_argument("--sentencepiece-defaults", action="store_true",
                  help="train with sentencepiece's own defaults instead (lossy: NFKC normalisation, whitespace runs "
                  "and newlines collapsed, characters unseen in training become UNK); what longctx did before")

  x = sub.add_parser(
      "export", help=f"export a run's weights: portable safetensors, or a Hugging Face directory ({hf_names})",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Export the weights of a checkpoint of RUN_DIR into a new directory OUT (written to a\n"
      "temporary directory first and renamed when complete, so OUT is never half-written).\n\n"
      "  --format safetensors  any model: OUT/model.safetensors (every parameter under its dotted name, e.g.\n"
      "                        blocks.0.mixer.in_proj, float32) and OUT/config.json (model config, step,\n"
      "                        tokenizer); readable by any framework, and by `longctx train --init-from OUT`\n"
      f"  --format hf           {hf_names} only: OUT/config.json + OUT/model.safetensors that transformers'\n"
      "                        AutoModelForCausalLM.from_pretrained(OUT) loads and that give the same logits; a\n"
      "                        setting HF cannot express is refused",
      epilog="examples:\n"
      "  longctx export runs/quickstart --format safetensors --out exports/quickstart\n"
      "  longctx export runs/mamba --format hf --out exports/mamba-hf --step 2000")
  x.add_argument("run_dir", metavar="RUN_DIR",
                 help="a run directory written by `longctx train`, or one of its checkpoints/STEP directories")
  x.add_argument("--format", required=True, choices=("safetensors", "hf"),
                 help=f"safetensors: longctx names and layouts, every model; hf: a transformers directory "
                 f"(models {hf_names})")
  x.add_argument("--out", required=True, metavar="DIR",
                 help="the directory to create; it must not exist yet or be empty")
  x.add_argument("--step", type=int, default=None, metavar="N",
                 help="the checkpoint step to export (default: the latest in RUN_DIR/checkpoints)")

  ih = sub.add_parser(
      "import-hf", help=f"convert a Hugging Face directory ({', '.join(hf.values()) or 'none'}) into a longctx export "
      "to fine-tune",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description=f"Read a local transformers directory of model_type {', '.join(hf.values())} (config.json plus\n"
      "model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin, which needs torch)\n"
      "and write it to OUT in the format of `longctx export --format safetensors`; fine-tune it with\n"
      "`longctx train RECIPE --init-from OUT`. HF settings longctx cannot compute (use_bias, another\n"
      "hidden_act, a time_step_limit) are refused with one line; nothing is downloaded.",
      epilog="example:\n  longctx import-hf ~/models/mamba-130m-hf --out exports/mamba-130m")
  ih.add_argument("hf_dir", metavar="HF_DIR", help="a local Hugging Face model directory (config.json + weights)")
  ih.add_argument("--out", required=True, metavar="DIR",
                  help="the longctx export directory to create; it must not exist yet or be empty")

  b = sub.add_parser(
      "bench", help="measure train and streaming-inference throughput, FLOPs, MFU and memory",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Benchmark each model (random weights and tokens) in one process:\n"
      "  train   tokens/s of the train step per d_model and segment length (--seg-lens)\n"
      "  stream  tokens/s of streaming inference per total length (--stream-lengths, up to 1M and beyond),\n"
      "          one segment at a time through the model state; memory should stay flat\n"
      "with analytic FLOPs per token, MFU against a matmul peak measured in the same process, compiled memory "
      "(memory_analysis) and peak RSS. Ratios: 'x base' against the first --models entry at the same size and "
      "length, 'x first' against the same model at the shortest length.",
      epilog="examples:\n"
      "  longctx bench --d-models 128,256,512 --seg-lens 512,2048\n"
      "  longctx bench --d-models 128 --seg-lens '' --stream-lengths 1k,16k,256k,1M --json bench.json")
  b.add_argument("--models", "--model", dest="models", default="transformer",
                 help=f"comma-separated registered models, the first the baseline (default transformer); one of "
                 f"{', '.join(models)}")
  b.add_argument("--d-models", default="128,256,512", help="comma-separated d_model values (default 128,256,512)")
  b.add_argument("--seg-lens", default="512,2048",
                 help="train table: comma-separated segment lengths (default 512,2048; '' = no train table)")
  b.add_argument("--tokens-per-step", type=int, default=8192,
                 help="train table: lanes x seg_len per step (default 8192)")
  b.add_argument("--stream-lengths", default="",
                 help="stream table: comma-separated total lengths, e.g. 1k,16k,256k,1M (default: none); "
                 "uses the first --d-models value")
  b.add_argument("--stream-seg-len", type=int, default=1024, help="stream table: tokens per segment (default 1024)")
  b.add_argument("--stream-lanes", type=int, default=1, help="stream table: streams in parallel (default 1)")
  b.add_argument("--layers", type=int, default=4, help="layers per model (default 4)")
  b.add_argument("--window", type=int, default=256, help="attention window (default 256)")
  b.add_argument("--steps", type=int, default=5, help="train table: timed steps per configuration (default 5)")
  b.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
  b.add_argument("--set", action="append", default=[], metavar="model.FIELD=VALUE",
                 help="model config override, repeatable; applies to each model whose config has FIELD "
                 "(e.g. --set model.memory_size=65536 --set model.block_len=256)")
  b.add_argument("--json", default=None, help="also write the results to this JSON file")
  b.add_argument("--no-progress", action="store_true", help="no progress bars")
  return p


# glibc malloc for XLA on a CPU host. XLA allocates each executable's temporaries anew per call; glibc serves
# blocks that large from per-thread arenas or fresh mmaps and hands the pages back on free, so every train step
# page-faults its whole working set in again (50k faults a step at the peers' bench size; 1.2x the step time on
# a CPU core). One arena, no mmap and no trimming keep those pages mapped from step to step.
MALLOC_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"


def cpu_host() -> bool:
  """True when jax will run on the CPU (JAX_PLATFORMS=cpu, or no GPU / TPU device files)."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/accel0", "/dev/vfio"))


def entry() -> None:
  """The `longctx` command: on a glibc CPU host, re-run itself once with `MALLOC_TUNABLES` (unless
  GLIBC_TUNABLES is already set, or LONGCTX_MALLOC=system), then `main`."""
  import platform

  if (os.environ.get("LONGCTX_MALLOC", "tuned") == "tuned" and "GLIBC_TUNABLES" not in os.environ
      and sys.platform == "linux" and platform.libc_ver()[0] == "glibc" and cpu_host()):
    env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES)
    os.execve(sys.executable, [sys.executable, "-m", "longctx.cli", *sys.argv[1:]], env)
  sys.exit(main())


def main(argv: list[str] | None = None) -> int:
  try:
    parser = _parser()  # names the registered models: a model plugin that fails to import is one line too
  except LongctxError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help()
    return 0
  try:
    if args.command == "train":
      return _train(args)
    if args.command == "eval":
      return _eval(args)
    if args.command == "generate":
      from longctx.generate import run_generate_cli

      return run_generate_cli(args)
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
                                 model_type=args.model_type, text_field=args.text_field,
                                 lossless=not args.sentencepiece_defaults)
      print(f"wrote {path}; use it with --set data.tokenizer={path}")
      return 0
    if args.command == "export":
      from longctx.export import export_run

      out = export_run(args.run_dir, fmt=args.format, out=args.out, step=args.step)
      print(f"wrote {out} (--format {args.format}: config.json, model.safetensors)")
      return 0
    if args.command == "import-hf":
      from longctx.export import import_hf

      out = import_hf(args.hf_dir, out=args.out)
      print(f"wrote {out}; fine-tune it with: longctx train RECIPE.py --init-from {out}")
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
  from longctx import distributed
  from longctx import recipe as recipe_lib

  # A dry run stays on this host; training joins the other processes first, before JAX starts its backend.
  if not args.dry_run and distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                                 auto=args.distributed):
    import jax

    if jax.process_index() != 0:  # one process speaks for the run; errors still reach stderr
      sys.stdout = open(os.devnull, "w")
  if args.stop_at_step is not None and args.stop_at_step < 1:
    raise ConfigError(f"--stop-at-step={args.stop_at_step} must be >= 1 (the step after which this run ends)")
  overrides = args.overrides + ([f"train.init_from={args.init_from}"] if args.init_from else [])
  cfg = recipe_lib.load_and_check(args.recipe, overrides)
  if args.dry_run:
    from longctx.estimate import estimate_run

    print(f"recipe {args.recipe}: model {cfg.model.name}")
    estimate = estimate_run(cfg)
    for line in estimate.lines():
      print(line)
    if not args.no_compile:
      from longctx.dryrun import compiled_memory

      sys.stdout.flush()
      compiled = compiled_memory(cfg, num_devices=math.prod(estimate.mesh.values()), full=args.full_compile,
                                 tpu_topology=args.tpu_topology)
      for line in compiled.lines():
        print(line)
    return 0
  from longctx.training.loop import run_training

  run_dir = args.run_dir or os.path.join("runs", pathlib.Path(args.recipe).stem)
  summary = run_training(cfg, run_dir, stop_at_step=args.stop_at_step, progress=not args.no_progress)
  if summary["end_step"] < cfg.train.steps and not summary.get("stopped_by"):  # a signal's stop said so already
    print(f"stopped at step {summary['end_step']}; rerun the same command to resume from it")
  print(f"run dir: {run_dir} (metrics.jsonl, tensorboard/, loss.png, checkpoints/)")
  return 0


def _eval(args) -> int:
  from longctx.eval import report

  if args.compare:
    if args.run_dir:
      raise ConfigError("give either RUN (to evaluate) or --compare RUN_A RUN_B ... (to compare), not both")
    runs = [report.load_results(path) for path in args.compare]
    out = pathlib.Path(args.out or "eval_compare")
    print(report.format_tables(runs))
    plots = report.write_plots(runs, out)
    print(f"plots: {', '.join(str(p) for p in plots)}")
    return 0
  if not args.run_dir:
    raise ConfigError("longctx eval needs a run directory (or --compare RUN_A RUN_B ...)")
  if args.max_batches < 0:
    raise ConfigError(f"--max-batches={args.max_batches} must be >= 0 (0 = every held-out document)")
  from longctx.eval import load_trained

  model = load_trained(args.run_dir, overrides=args.overrides)
  if args.task is None:
    return _heldout_eval(model, args)
  from longctx.eval import default_lengths, parse_lengths, run_suite
  from longctx.eval.tasks import parse_eval_tasks

  tasks = parse_eval_tasks(args.task)
  try:
    lengths = parse_lengths(args.lengths) if args.lengths else default_lengths(model)
  except ConfigError as e:
    raise ConfigError(f"--lengths: {e}") from None
  if args.examples < 1:
    raise ConfigError(f"--examples={args.examples} must be >= 1")
  seg_len = args.seg_len or model.cfg.data.seg_len
  if seg_len < 1:
    raise ConfigError(f"--seg-len={seg_len} must be >= 1")
  depths = [_float01(x, "--depths") for x in args.depths.split(",")] if args.depths else None
  pairs = [_count(x, "--pairs") for x in args.pairs.split(",")] if args.pairs else None
  results = run_suite(model, tasks=tasks, lengths=lengths, examples=args.examples, seg_len=seg_len,
                      seed=args.seed, depths=depths, pairs=pairs, progress=not args.no_progress, label=args.label)
  out = pathlib.Path(args.out) if args.out else report.eval_dir(model.run_dir)
  path = report.save_results(out, results)
  print(report.format_tables([results]))
  plots = report.write_plots([report.load_results(path)], out)
  print(f"results: {path}; plots: {', '.join(str(p) for p in plots)}")
  return 0


def _float01(text: str, flag: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not 0.0 <= value <= 1.0:
    raise ConfigError(f"{flag}: {text!r} is not a number in [0, 1]")
  return value


def _count(text: str, flag: str) -> int:
  if not text.strip().isdigit() or int(text) < 1:
    raise ConfigError(f"{flag}: {text!r} is not a positive integer")
  return int(text)


def _heldout_eval(model, args) -> int:
  from longctx.training.loop import build_pipeline, eval_line, evaluate

  trainer = model.trainer(lanes=model.cfg.data.batch_size, seg_len=model.cfg.data.seg_len,
                          segments=model.cfg.data.segments_per_step)
  metrics = evaluate(trainer, build_pipeline(model.cfg), model.params, max_batches=args.max_batches)
  print(eval_line(model.step, metrics, limit="--max-batches"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
