#!/usr/bin/env python
"""Decoder LLM latency and throughput on the CPU: SmolLM2-135M (LlamaForCausalLM configuration, random weights unless
--real) as Hugging Face FP32 / BF16 / torch.compile / torchao INT8, and as zqhero step graphs (fp, M1, M2, M3), in one
process.

Workloads (every variant runs the same ones):

  prefill 1x512, prefill 8x128   one forward over the prompt into an empty KV cache; the logits of ALL prompt positions
                                 are computed (the zqhero step graph always returns the logits of every new token, so
                                 the Hugging Face variants run with logits_to_keep=0, their default, too)
  decode b1, decode b8           --steps single-token steps after a 512-token prefill, greedy (argmax) tokens;
                                 tokens/s = batch * steps / seconds. The prefill is done once per variant, untimed, at
                                 batch 1; for batch 8 its cache is replicated to 8 rows (decode cost does not depend on
                                 the cache's values). Every round starts again from the same 512 cached tokens
                                 (DynamicCache/StaticCache cropped back, step-graph mask slots cleared).

Variants:

  fp32_eager              the HF model with a DynamicCache: what `generate` uses for this model (its generation config
                          sets no cache_implementation)
  fp32_compile            torch.compile(HF model, dynamic=False) with a StaticCache (HF's recipe for compiled decoding:
                          a static cache, one graph per shape); the decode-setup prefill runs eagerly, as in `generate`
  bf16_eager              the HF model cast to bfloat16, DynamicCache
  torchao_int8_compile    torchao Int8DynamicActivationInt8WeightConfig on every nn.Linear (lm_head included) +
                          torch.compile(dynamic=False), StaticCache
  zqhero_<mode>           zqhero_fx.trace(model, max_cache_len=...) + zqhero_fx.convert(mode, calibration=random-token
                          batches), the GraphModule as convert returns it, run through decoder.run_step with
                          preallocated caches (float caches for fp/M1/M2, INT8 for modes that quantize attention)
  zqhero_<mode>_compile   zqhero_fx.compile of that GraphModule (Inductor, dynamic shapes), same caches

Timing: every variant is built and every workload warmed up first (the first call of a compiled variant compiles; its
seconds are reported as first_call_s). A variant whose first calls take longer than --compile-budget seconds is dropped
for its remaining workloads, with the reason recorded. Then --rounds rounds: in each, every workload runs once for every
variant in turn (round-robin), so machine noise hits all variants alike; the median over rounds is reported with its
min-max. Variants or workloads that cannot be built or run (torchao missing, a compile failing) are recorded with the
reason in the table and the JSON instead of stopping the run.

On a machine shared with other busy processes, OpenMP's default spin-waiting makes every parallel region wait for a
descheduled thread: on a 2-core VM at load 5 the FP32 decode step ran 18x slower with 2 threads than with 1.
OMP_WAIT_POLICY=passive (set before Python starts; recorded in the header) removes that artefact; on a quiet machine
leave it unset.

    python benchmarks/bench_decoder.py --out /tmp/dec                          # full SmolLM2-135M config, all variants
    python benchmarks/bench_decoder.py --layers 4 --rounds 2 --steps 8 --variants fp32_eager,zqhero_M3 --out /tmp/dec
    python benchmarks/bench_decoder.py --real --out /tmp/dec                   # the real SmolLM2-135M-Instruct weights
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = ("fp", "M1", "M2", "M3")
ALL_VARIANTS = ("fp32_eager", "fp32_compile", "bf16_eager", "torchao_int8_compile",
                *(f"zqhero_{m}" for m in MODES), *(f"zqhero_{m}_compile" for m in MODES))
DEFAULT_VARIANTS = ("fp32_eager", "fp32_compile", "bf16_eager", "torchao_int8_compile",
                    *(f"zqhero_{m}" for m in MODES), "zqhero_M3_compile")
REFERENCE = "fp32_eager"

# SmolLM2-135M(-Instruct)'s config.json, as a LlamaConfig.
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, hidden_act="silu",
                    bos_token_id=1, eos_token_id=2, pad_token_id=2)
# The smoke test's toy: same structure (GQA 4:2, tied embeddings), tiny sizes.
TINY = dict(SMOLLM2_135M, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=2048)

OMP_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS")
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8",
         "amx_bf16", "amx_fp16")


# ---------------------------------------------------------------- host description
def host_info() -> dict:
    model, flags = "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("transformers", "torchao"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just absent from the list
            versions[name] = None
    return {"cpu": model or platform.processor() or "unknown CPU", "isa": [f for f in FLAGS if f in flags],
            "amx": any(f.startswith("amx") for f in flags),
            "vnni": "avx512_vnni" in flags or "avx_vnni" in flags,
            "logical_cpus": os.cpu_count(), "usable_cpus": usable, "torch_threads": torch.get_num_threads(),
            "host": platform.node(), "versions": versions, "commit": _commit(), "load_avg_start": _load(),
            "env": {k: os.environ[k] for k in OMP_ENV if k in os.environ}}


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT).stdout.strip()
        return (out.stdout.strip() or "unknown") + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def _load():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------- models
def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.real:
        from zqhero_fx.eval.assets import load_smollm2

        model, _ = load_smollm2(progress=False)
        if args.layers is not None and args.layers < model.config.num_hidden_layers:
            model.model.layers = model.model.layers[:args.layers]
            model.config.num_hidden_layers = args.layers
            if getattr(model.config, "layer_types", None):
                model.config.layer_types = model.config.layer_types[:args.layers]
        return model.eval(), "SmolLM2-135M-Instruct (real weights)"
    dims = dict(TINY if args.tiny else SMOLLM2_135M)
    if args.layers is not None:
        dims["num_hidden_layers"] = args.layers
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**dims, attn_implementation="sdpa")).eval()
    return model, ("toy Llama (smoke test dims)" if args.tiny else "SmolLM2-135M configuration, random weights")


def tensor_bytes(t) -> int:
    """Bytes of a tensor, looking inside tensor subclasses (torchao's quantized weights) at their inner tensors."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def model_bytes(module: torch.nn.Module) -> int:
    """Parameters, buffers and tensor constants (a GraphModule's get_attr targets), each storage counted once (the
    tied embedding / lm_head weight of the FP32 model is counted once)."""
    tensors = {**dict(module.named_parameters(remove_duplicate=False)),
               **dict(module.named_buffers(remove_duplicate=False))}  # non-persistent buffers (RoPE) too
    if isinstance(module, torch.fx.GraphModule):
        for node in module.graph.nodes:
            if node.op == "get_attr":
                value = module
                for part in node.target.split("."):
                    value = getattr(value, part)
                if isinstance(value, torch.Tensor):
                    tensors[node.target] = value
    seen, total = set(), 0
    for t in tensors.values():
        if not isinstance(t, torch.Tensor):
            continue
        plain = type(t) in (torch.Tensor, torch.nn.Parameter) or not hasattr(t, "__tensor_flatten__")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if plain else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += tensor_bytes(t)
    return total


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


# ---------------------------------------------------------------- runners
class Workloads:
    """The prompts every variant sees: prefill prompts and the decode prompt (one 512-token sequence)."""

    def __init__(self, vocab: int, prefill: list[tuple[int, int]], context: int, decode_batches: list[int],
                 steps: int):
        g = torch.Generator().manual_seed(1234)
        self.prefill = {f"prefill_{b}x{t}": torch.randint(0, vocab, (b, t), generator=g) for b, t in prefill}
        self.context = context
        self.decode_prompt = torch.randint(0, vocab, (1, context), generator=g)
        self.decode_batches = decode_batches
        self.steps = steps

    def names(self) -> list[str]:
        return [*self.prefill, *(f"decode_b{b}" for b in self.decode_batches)]


def _repeat_rows(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t.expand(batch, *t.shape[1:]).contiguous()


class HFRunner:
    """A Hugging Face causal LM called directly (forward only, as `generate` calls it), with a DynamicCache (eager
    variants) or a StaticCache (compiled variants)."""

    def __init__(self, model, call, work: Workloads, static: bool):
        self.model, self.call, self.work, self.static = model, call, work, static
        self.config = model.config
        self.prefill_caches = {}
        self.decode_caches = {}
        self._base = None

    def cache_dtype(self):
        for p in self.model.parameters():
            if p.dtype.is_floating_point and type(p) in (torch.Tensor, torch.nn.Parameter):
                return p.dtype
        return torch.float32

    def _static(self, batch: int, length: int):
        from transformers import StaticCache

        cache = StaticCache(config=self.config, max_cache_len=length)
        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        cache.early_initialization(batch_size=batch, num_heads=c.num_key_value_heads, head_dim=head_dim,
                                   dtype=self.cache_dtype(), device=next(self.model.parameters()).device)
        return cache

    def prefill(self, name: str):
        ids = self.work.prefill[name]
        if self.static:  # one StaticCache per prompt shape, emptied again after each prefill
            cache = self.prefill_caches.get(name)
            if cache is None:
                cache = self.prefill_caches[name] = self._static(*ids.shape)
            logits = self.call(input_ids=ids, cache=cache, use_cache=True).logits
            cache.crop(-ids.shape[1])
            return logits
        from transformers import DynamicCache

        return self.call(input_ids=ids, cache=DynamicCache(config=self.config), use_cache=True).logits

    def setup_decode(self, batch: int):
        """The decode prompt prefilled once per variant (eagerly, untimed: `generate` does not compile the prefill
        either), its cache replicated to `batch` rows; keeps (cache, first token)."""
        from transformers import DynamicCache

        work = self.work
        length = work.context + work.steps
        if self._base is None:
            with torch.no_grad():
                cache = self._static(1, length) if self.static else DynamicCache(config=self.config)
                logits = self.model(input_ids=work.decode_prompt, cache=cache, use_cache=True).logits
            self._base = (cache, logits[:, -1].argmax(-1, keepdim=True))
        base, token = self._base
        if self.static:
            cache = self._static(batch, length)
            for src, dst in zip(base.layers, cache.layers):
                dst.keys.copy_(src.keys.expand_as(dst.keys))
                dst.values.copy_(src.values.expand_as(dst.values))
                dst.cumulative_length.fill_(work.context)
        else:
            cache = copy.deepcopy(base)
            if batch > 1:
                cache.batch_repeat_interleave(batch)
        self.decode_caches[batch] = (cache, _repeat_rows(token, batch))

    def decode(self, batch: int):
        cache, token = self.decode_caches[batch]
        for _ in range(self.work.steps):
            logits = self.call(input_ids=token, cache=cache, use_cache=True).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
        return token

    def rewind(self, batch: int):
        self.decode_caches[batch][0].crop(-self.work.steps)


class StepRunner:
    """A zqhero step graph (converted, optionally compiled) on preallocated caches (decoder.step_inputs)."""

    def __init__(self, gm, call, work: Workloads):
        self.gm, self.call, self.work = gm, call, work
        self.layers = gm.meta["zqhero_decoder"].num_layers
        self.prefill_inputs = {}
        self.decode_state = {}
        self._base = None

    def _run(self, flat):
        if self.call is self.gm:  # the GraphModule as convert returns it: through the public step API
            from zqhero_fx import decoder

            return decoder.run_step(self.gm, flat)
        # A compiled module is no GraphModule (run_step wants the spec in gm.meta); its caches were checked once.
        return self.call(*flat[:4], list(flat[4:4 + self.layers]), list(flat[4 + self.layers:]))

    def _inputs(self, ids, cache_len=None):
        from zqhero_fx import decoder

        flat = decoder.step_inputs(self.gm, ids, cache_len=cache_len)
        decoder.check_cache(self.gm, flat[4:4 + self.layers], flat[4 + self.layers:])  # what run_step checks
        return flat

    def prefill(self, name: str):
        flat = self.prefill_inputs.get(name)
        if flat is None:  # preallocated once; every prefill rewrites the same cache slots
            flat = self.prefill_inputs[name] = self._inputs(self.work.prefill[name])
        return self._run(flat)

    def setup_decode(self, batch: int):
        """The decode prompt prefilled once per variant (untimed), its cache replicated to `batch` rows."""
        work = self.work
        if self._base is None:
            flat = self._inputs(work.decode_prompt, cache_len=work.context + work.steps)
            with torch.no_grad():
                logits = self._run(flat)
            self._base = (flat, logits[:, -1].argmax(-1, keepdim=True))
        base, token = self._base
        flat = [t if i == 2 else t.expand(batch, *t.shape[1:]).clone() for i, t in enumerate(base)]
        slots = [torch.tensor([work.context + i]) for i in range(work.steps)]
        positions = [torch.full((batch, 1), work.context + i, dtype=torch.long) for i in range(work.steps)]
        self.decode_state[batch] = (flat, _repeat_rows(token, batch), slots, positions)

    def decode(self, batch: int):
        flat, token, slots, positions = self.decode_state[batch]
        mask = flat[3]
        for slot, position in zip(slots, positions):
            mask[:, slot] = 1
            flat[0], flat[1], flat[2] = token, position, slot
            logits = self._run(flat)
            token = logits[:, -1].argmax(-1, keepdim=True)
        return token

    def rewind(self, batch: int):
        self.decode_state[batch][0][3][:, self.work.context:] = 0


# ---------------------------------------------------------------- building the variants
def build_variants(model, names, work: Workloads, calibration, max_cache_len: int):
    """{name: runner} and {name: reason} for the ones that could not be built, plus build facts (bytes, seconds)."""
    import zqhero_fx

    runners, skipped, facts = {}, {}, {}

    def add(name, build):
        start = time.perf_counter()
        try:
            runner, module = build()
        except Exception as error:  # noqa: BLE001 - record and continue
            skipped[name] = f"build failed: {_reason(error)}"
            print(f"skipping {name}: {skipped[name]}", file=sys.stderr)
            return
        runners[name] = runner
        facts[name] = {"model_bytes": model_bytes(module), "build_s": round(time.perf_counter() - start, 2)}

    def hf_compiled(m):
        return torch.compile(m, dynamic=False)

    for name in names:
        if name == "fp32_eager":
            add(name, lambda: (HFRunner(model, model, work, static=False), model))
        elif name == "fp32_compile":
            add(name, lambda: (HFRunner(model, hf_compiled(model), work, static=True), model))
        elif name == "bf16_eager":
            def bf16():
                m = copy.deepcopy(model).to(torch.bfloat16)
                return HFRunner(m, m, work, static=False), m
            add(name, bf16)
        elif name == "torchao_int8_compile":
            def torchao():
                try:
                    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
                except ImportError as error:
                    raise RuntimeError(f"torchao is not installed ({error}); pip install torchao") from error
                m = copy.deepcopy(model)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    quantize_(m, Int8DynamicActivationInt8WeightConfig())
                return HFRunner(m, hf_compiled(m), work, static=True), m
            add(name, torchao)
    modes = [m for m in MODES if f"zqhero_{m}" in names or f"zqhero_{m}_compile" in names]
    if not modes:
        return runners, skipped, facts
    try:
        start = time.perf_counter()
        traced = zqhero_fx.trace(model, {"input_ids": work.decode_prompt[:, :8]}, max_cache_len=max_cache_len)
        trace_s = time.perf_counter() - start
    except Exception as error:  # noqa: BLE001
        for m in modes:
            for name in (f"zqhero_{m}", f"zqhero_{m}_compile"):
                if name in names:
                    skipped[name] = f"trace failed: {_reason(error)}"
        return runners, skipped, facts
    for mode in modes:
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                converted = zqhero_fx.convert(traced, mode, calibration=None if mode == "fp" else calibration)
        except Exception as error:  # noqa: BLE001
            for name in (f"zqhero_{mode}", f"zqhero_{mode}_compile"):
                if name in names:
                    skipped[name] = f"convert failed: {_reason(error)}"
            continue
        convert_s = time.perf_counter() - start
        timings = converted.meta.get("zqhero", {}).get("timings", {})
        conv = {"trace_s": round(trace_s, 2), "convert_s": round(convert_s, 2),
                "calibrate_s": round(timings.get("calibrate", 0.0), 2)}
        if f"zqhero_{mode}" in names:
            add(f"zqhero_{mode}", lambda q=converted: (StepRunner(q, q, work), q))
            if f"zqhero_{mode}" in facts:
                facts[f"zqhero_{mode}"].update(conv)
        if f"zqhero_{mode}_compile" in names:
            add(f"zqhero_{mode}_compile",
                lambda q=converted: (StepRunner(q, zqhero_fx.compile(q), work), q))
            if f"zqhero_{mode}_compile" in facts:
                facts[f"zqhero_{mode}_compile"].update(conv)
    return runners, skipped, facts


def kv_bytes_per_token(runner) -> int | None:
    """KV cache bytes one token takes (all layers, keys + values) in this variant's cache."""
    if isinstance(runner, StepRunner):
        from zqhero_fx import decoder

        spec = runner.gm.meta["zqhero_decoder"]
        return sum(spec.kv_heads * (spec.key_dim * k.itemsize + spec.value_dim * v.itemsize)
                   for k, v in decoder.cache_dtypes(runner.gm))
    c = runner.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers * c.num_key_value_heads * 2 * head_dim * runner.cache_dtype().itemsize


# ---------------------------------------------------------------- measuring
def _call(runner, workload: str, batch_of):
    if workload.startswith("prefill"):
        return runner.prefill(workload)
    b = batch_of(workload)
    out = runner.decode(b)
    runner.rewind(b)
    return out


def measure(runners, work: Workloads, rounds: int, compile_budget: float):
    """{(variant, workload): [seconds per round]}, {(variant, workload): first-call seconds}, {key: reason}."""
    batch_of = lambda w: int(w.split("_b")[1])  # noqa: E731
    samples, first_call, failed = {}, {}, {}
    with torch.no_grad():
        for name, runner in runners.items():
            spent = 0.0
            for workload in work.names():
                key = (name, workload)
                if spent > compile_budget:
                    failed[key] = (f"skipped: first calls of {name} already took {spent:.0f} s "
                                   f"(> --compile-budget {compile_budget:.0f} s)")
                    continue
                print(f"  warm-up {name} {workload}...", file=sys.stderr, flush=True)
                start = time.perf_counter()
                try:
                    if workload.startswith("decode"):
                        runner.setup_decode(batch_of(workload))
                    _call(runner, workload, batch_of)
                except Exception as error:  # noqa: BLE001 - one broken variant must not lose the run
                    failed[key] = f"failed: {_reason(error)}"
                    print(f"  {name} {workload}: {failed[key]}", file=sys.stderr)
                    if os.environ.get("BENCH_DECODER_TRACEBACK"):
                        traceback.print_exc()
                    continue
                first_call[key] = time.perf_counter() - start
                spent += first_call[key]
                samples[key] = []
        for r in range(rounds):
            print(f"  round {r + 1}/{rounds}", file=sys.stderr, flush=True)
            for workload in work.names():
                for name, runner in runners.items():
                    key = (name, workload)
                    if key not in samples:
                        continue
                    start = time.perf_counter()
                    if workload.startswith("prefill"):
                        runner.prefill(workload)
                        samples[key].append(time.perf_counter() - start)
                    else:
                        b = batch_of(workload)
                        runner.decode(b)
                        samples[key].append(time.perf_counter() - start)
                        runner.rewind(b)
    return samples, first_call, failed


def summarise(samples, first_call, failed, work_names, steps: int, facts=None, skipped=None):
    """One row per variant: per workload the median / min / max (ms for prefill, tokens/s for decode), the speedup
    over fp32_eager, and the reason where it did not run; model bytes and their ratio to fp32_eager."""
    facts, skipped = facts or {}, skipped or {}
    names = list(dict.fromkeys([k[0] for k in samples] + [k[0] for k in failed] + list(skipped)))
    rows = {}
    for name in names:
        row = {"variant": name, "workloads": {}, **facts.get(name, {})}
        if name in skipped:
            row["skipped"] = skipped[name]
        for w in work_names:
            times = samples.get((name, w))
            if not times:
                cell = {"status": failed.get((name, w)) or skipped.get(name) or "not run"}
            elif w.startswith("prefill"):
                cell = {"status": "ok", "median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
                        "max_ms": 1e3 * max(times), "rounds": len(times), "seconds": times}
            else:
                batch = int(w.split("_b")[1])
                rate = lambda s: batch * steps / s  # noqa: E731
                cell = {"status": "ok", "tokens_per_s": rate(statistics.median(times)), "min_tokens_per_s":
                        rate(max(times)), "max_tokens_per_s": rate(min(times)), "rounds": len(times),
                        "steps": steps, "batch": batch, "seconds": times}
            if (name, w) in first_call:
                cell["first_call_s"] = round(first_call[(name, w)], 3)
            row["workloads"][w] = cell
        rows[name] = row
    ref = rows.get(REFERENCE)
    for row in rows.values():
        for w, cell in row["workloads"].items():
            base = ref["workloads"].get(w) if ref else None
            cell["speedup_vs_fp32_eager"] = None
            if base and cell["status"] == "ok" and base["status"] == "ok":
                if "median_ms" in cell:
                    cell["speedup_vs_fp32_eager"] = base["median_ms"] / cell["median_ms"]
                else:
                    cell["speedup_vs_fp32_eager"] = cell["tokens_per_s"] / base["tokens_per_s"]
        row["bytes_vs_fp32_eager"] = (row["model_bytes"] / ref["model_bytes"]
                                      if ref and row.get("model_bytes") and ref.get("model_bytes") else None)
    return list(rows.values())


def _mb(n):
    if n is None:
        return "-"
    return f"{n / 2**20:.0f} MiB" if n >= 10 * 2**20 else f"{n / 2**10:.0f} KiB"


def markdown(rows, work_names, meta) -> str:
    host = meta["host"]
    isa = ", ".join(host["isa"]) or "none of " + "/".join(FLAGS)
    lines = [
        f"# Decoder CPU benchmark: {meta['model']}, {meta['layers']} layers",
        "",
        f"{host['cpu']} ({isa}; AMX: {'yes' if host['amx'] else 'no'}, VNNI: {'yes' if host['vnni'] else 'no'}), "
        f"{host['usable_cpus']} usable CPUs / {host['logical_cpus']} logical, {host['torch_threads']} torch threads; "
        f"torch {host['versions']['torch']}, transformers {host['versions']['transformers']}, torchao "
        f"{host['versions']['torchao'] or 'not installed'}; {meta['date']}, commit {host['commit']}, host "
        f"{host['host']}; load average {host['load_avg_start']} at start, {meta.get('load_avg_end')} at end"
        + (f"; {' '.join(f'{k}={v}' for k, v in host.get('env', {}).items())}" if host.get("env") else "") + ".",
        "",
        f"Prefill: one forward into an empty cache, logits of all positions, median ms over {meta['rounds']} "
        f"interleaved rounds. Decode: {meta['steps']} greedy single-token steps after a {meta['context']}-token "
        "prefill, tokens/s = batch x steps / s. In brackets: speedup over fp32_eager (> 1 is faster); for model bytes "
        "the size relative to fp32_eager (tied embedding counted once).",
        "",
    ]
    if meta.get("note"):
        lines[-1:-1] = ["", meta["note"]]
    header = ["variant"]
    for w in work_names:
        header.append(f"{w.replace('_', ' ')} {'ms' if w.startswith('prefill') else 'tok/s'}")
    header += ["model bytes", "KV B/token"]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    notes = []
    for row in rows:
        cells = [row["variant"]]
        for w in work_names:
            cell = row["workloads"][w]
            if cell["status"] != "ok":
                notes.append(f"{row['variant']} {w}: {cell['status']}")
                cells.append("n/a" + f" [{len(notes)}]")
                continue
            value = f"{cell['median_ms']:.0f}" if "median_ms" in cell else f"{cell['tokens_per_s']:.1f}"
            up = cell["speedup_vs_fp32_eager"]
            cells.append(value + (f" ({up:.2f}x)" if up is not None else ""))
        ratio = row.get("bytes_vs_fp32_eager")
        cells.append(_mb(row.get("model_bytes")) + (f" ({ratio:.2f}x)" if ratio is not None else ""))
        cells.append(str(row.get("kv_bytes_per_token", "-")))
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += [""] + [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
    spreads = []
    for row in rows:
        parts = []
        for w in work_names:
            cell = row["workloads"][w]
            if cell["status"] == "ok":
                spread = (f"{cell['min_ms']:.0f}-{cell['max_ms']:.0f} ms" if "min_ms" in cell else
                          f"{cell['min_tokens_per_s']:.1f}-{cell['max_tokens_per_s']:.1f} tok/s")
                parts.append(f"{w} {spread} (first call {cell.get('first_call_s', 0):.1f} s)")
        if parts:
            spreads.append(f"| {row['variant']} | {'; '.join(parts)} |")
    if spreads:
        lines += ["", "Spread over rounds (min-max) and the first call's seconds (compiles included):", "",
                  "| variant | spread |", "|---|---|"] + spreads
    builds = [r for r in rows if "build_s" in r]
    if builds:
        lines += ["", "| variant | build s | trace s | convert s (calibration s) |", "|---|---:|---:|---:|"]
        for r in builds:
            conv = f"{r['convert_s']} ({r['calibrate_s']})" if "convert_s" in r else "-"
            lines.append(f"| {r['variant']} | {r['build_s']} | {r.get('trace_s', '-')} | {conv} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="the real SmolLM2-135M-Instruct (eval.assets.load_smollm2)")
    parser.add_argument("--layers", type=int, default=None, help="keep the first N decoder layers (default: all 30)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # toy dims for the smoke test
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, from: {', '.join(ALL_VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=5, help="timed interleaved rounds (median reported)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per round")
    parser.add_argument("--prefill", default="1x512,8x128", help="prefill shapes, BATCHxTOKENS, comma-separated")
    parser.add_argument("--context", type=int, default=512, help="tokens in the cache before the timed decode steps")
    parser.add_argument("--decode-batches", default="1,8")
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument("--calibration-shape", default="2x128", help="BATCHxTOKENS of each random calibration batch")
    parser.add_argument("--compile-budget", type=float, default=900.0,
                        help="seconds of first calls (compiles) per variant before its remaining workloads are skipped")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, help="directory for <stem>.json and <stem>.md")
    parser.add_argument("--stem", default="bench_decoder", help="file name stem under --out")
    parser.add_argument("--note", default="", help="a sentence for the table's header (why the run is reduced...)")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(ALL_VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(ALL_VARIANTS)}")
    args.variant_list = variants
    args.prefill_shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.prefill.split(",") if s]
    args.decode_batch_list = [int(b) for b in args.decode_batches.split(",") if b]
    args.calibration_dims = tuple(int(x) for x in args.calibration_shape.lower().split("x"))
    return args


def run(args) -> dict:
    os.environ.setdefault("SETUPTOOLS_USE_DISTUTILS", "stdlib")  # see zqhero_fx/inductor.py
    # Every compiled HF variant compiles the same forward code objects once per shape (dynamic=False); past Dynamo's
    # default recompile limit the later shapes would silently run eagerly and be measured as such.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.cache_size_limit = 64
    if args.threads:
        torch.set_num_threads(args.threads)
    host = host_info()
    model, description = build_model(args)
    config = model.config
    work = Workloads(config.vocab_size, args.prefill_shapes, args.context, args.decode_batch_list, args.steps)
    g = torch.Generator().manual_seed(99)
    cb, ct = args.calibration_dims
    calibration = [{"input_ids": torch.randint(0, config.vocab_size, (cb, ct), generator=g)}
                   for _ in range(args.calibration_batches)]
    max_cache_len = max([args.context + args.steps] + [t for _, t in args.prefill_shapes] + [ct])
    print(f"{description}, {config.num_hidden_layers} layers; {host['cpu']}, {host['torch_threads']} threads; "
          f"building {', '.join(args.variant_list)}...", file=sys.stderr, flush=True)
    runners, skipped, facts = build_variants(model, args.variant_list, work, calibration, max_cache_len)
    for name, runner in runners.items():
        facts[name]["kv_bytes_per_token"] = kv_bytes_per_token(runner)
    print(f"measuring {len(runners)} variants x {work.names()} x {args.rounds} rounds...", file=sys.stderr, flush=True)
    samples, first_call, failed = measure(runners, work, args.rounds, args.compile_budget)
    order = {n: i for i, n in enumerate(args.variant_list)}
    rows = sorted(summarise(samples, first_call, failed, work.names(), args.steps, facts, skipped),
                  key=lambda r: order.get(r["variant"], 99))
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "model": description, "layers": config.num_hidden_layers, "real_weights": args.real,
            "params": sum(p.numel() for p in model.parameters()), "rounds": args.rounds, "steps": args.steps,
            "context": args.context, "prefill": [f"{b}x{t}" for b, t in args.prefill_shapes],
            "decode_batches": args.decode_batch_list,
            "calibration": f"{args.calibration_batches} random-token batches of {cb}x{ct}",
            "max_cache_len": max_cache_len, "prefill_logits": "all positions",
            "hf_cache": {"eager": "DynamicCache", "compile": "StaticCache"},
            "host": host, "load_avg_end": _load(), "argv": sys.argv[1:], "note": args.note}
    return {"meta": meta, "rows": rows, "workloads": work.names()}


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    table = markdown(result["rows"], result["workloads"], result["meta"])
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.stem}.json").write_text(json.dumps(result, indent=1, default=str))
        (args.out / f"{args.stem}.md").write_text(table)
        print(f"wrote {args.out / (args.stem + '.json')} and {args.stem}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
