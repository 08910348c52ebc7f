"""Quantization modes as data. M1 ⊂ M2 ⊂ M3 in coverage; these presets are zqhero_fx's own definition (the paper's mode
table is not public), written up in docs/modes.md. A config names an activation format and a weight format
(zqhero_fx/formats.py); the presets use INT8, and "M1-fp8" / "M2-fp8" / "M3-fp8" the same sites in FP8 E4M3.

| site flag             | what turns quantized                                                              | scheme |
|-----------------------|-----------------------------------------------------------------------------------|--------|
| norm_fed_gemms (M1+)  | GEMMs fed by a LayerNorm / RMSNorm (QKV, FC1, gate/up); the norm emits the format + per-token scales | TWQ |
| fwq_gemms (M2+)       | GEMMs fed by another GEMM or attention through activations / gated products / head merges (attention-output projection, FC2, down_proj); static per-feature input scales folded into W | FWQ |
| attention (M3)        | Q.K^T, softmax probabilities and P.V; the producers of Q/K/V emit the format        | SQ (Q, K, P), FWQ (V) |
| embeddings (M3)       | embedding tables stored quantized with static per-row scales                      | SQ/row |
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from zqhero_fx.errors import ConfigError
from zqhero_fx.formats import Format, get_format
from zqhero_fx.weight_quant import WeightScheme

FLOAT_PRECISIONS = ("fp32", "fp16", "bf16")
DECODER_SMOOTHING = 0.8  # measured best of 0.5 / 0.8 on SmolLM2 (docs/modes.md, "Smoothing")


@dataclass(frozen=True)
class QuantConfig:
    """What a conversion does. Build one directly, or start from a preset: `MODES["M2"].replace(percentile=99.99)`."""

    name: str = "custom"
    # Number formats by name (see zqhero_fx.formats.FORMATS): activations ("none": weight-only, activations stay
    # float), and GEMM weights / embedding tables (None: the activation format). 4- and 6-bit weight formats are
    # stored packed (zqhero_fx/weights.py) and run zqhero::packed_linear; the fields below say how.
    activation_format: str = "int8"
    weight_format: str | None = None
    # Packed weights only. Group size: None = the format's default (INT4 64, FP4 32, FP6 per channel); 0 = per channel;
    # otherwise a multiple of 16 that must divide every quantized GEMM's input features (else a ConfigError).
    weight_group_size: int | None = None
    # "auto": "integer" with INT8 activations (DGQ), "power_of_two_ratio" with FP8 ones (ZeroQuant-FP's better
    # constraint), "none" (per channel) weight-only; or "power_of_two" (ZeroQuant-FP's other constraint).
    group_scales: str = "auto"
    weight_zero_point: bool | None = None  # None: asymmetric (DGQ's uint4) exactly when the group scales are integer
    weight_search: str = "none"  # "grid": DGQ's two-phase search of its two scale levels (integer group scales)
    lorc_rank: int = 0  # LoRC: rank of the low-rank error compensation (0: off); ZeroQuant-FP uses 8
    # "nearest" (the papers' round-to-nearest) or "gptq" (error-compensating rounding on calibration inputs)
    weight_rounding: str = "nearest"
    # Sites the mode quantizes (the table above).
    norm_fed_gemms: bool = False
    fwq_gemms: bool = False
    attention: bool = False
    embeddings: bool = False
    # GEMMs whose result is a model output (an LM head, a classifier: logits) stay float by default: their error
    # reaches the user unfiltered, and they are a small share of the FLOPs.
    quantize_heads: bool = False
    # Static-scale statistics: "absmax" (min-max) or "percentile" (of |x| per feature, averaged over batches).
    calibration_method: str = "absmax"
    percentile: float = 99.99
    # Static per-row scales for embedding tables ("row"), or one scale per table ("tensor", plain SQ).
    embedding_granularity: str = "row"
    # Scale of the quantized softmax probabilities; None: 1 / the activation format's max (exp(s - rowmax) lies in
    # (0, 1], so that covers it exactly: 1/127 for INT8, 1/448 for FP8 E4M3).
    softmax_scale: float | None = None
    # SmoothQuant-style migration of activation outliers from each norm's output into the GEMMs it feeds
    # (passes/smooth.py): the strength alpha in (0, 1) (0.5 in the paper), None (off), or "auto": 0.8 in a decoder
    # LLM's step graph (SmolLM2 perplexity: M1 +0.7% -> +0.4%, M2 +2.9% -> +0.9%, M3 +5.1% -> +2.4%), off elsewhere;
    # or "percentile": DGQ's percentile clipping (only channels above the 99.5th-percentile channel are squeezed).
    # Costs nothing at run time; needs calibration data where it applies.
    smoothing: float | str | None = "auto"
    # How FWQ sites (GEMMs fed by GEMMs/attention) scale their input (docs/modes.md, "FWQ on decoders"):
    # "static": the paper's static per-feature scales everywhere; "per_token": a dynamic per-token scale (a standalone
    # quantize after the producer); "auto" (default): per token in a decoder LLM's step graph (measured on SmolLM2:
    # M2 with static FWQ +29% perplexity, per token +2.9%), static elsewhere.
    fwq_activations: str = "auto"
    # Decoders: when attention is quantized, the KV cache stores K and V in the activation format with the
    # attention's static scales (passes/quantize_kv_cache.py); False keeps a float cache.
    quantize_kv_cache: bool = True
    # Device whose ridge point labels nodes memory- or compute-bound (see passes/classify.py).
    device: str = "cpu"

    def __post_init__(self):
        weight_only = str(self.activation_format).strip().lower() == "none"
        if weight_only and self.weight_format is None:
            raise ConfigError("activation_format='none' (weight-only) needs a weight_format")
        activation = None if weight_only else get_format(self.activation_format)
        weight = get_format(self.weight_format if self.weight_format is not None else activation)
        # Store canonical names, so aliases ("fp8", "e4m3") compare equal.
        object.__setattr__(self, "activation_format", "none" if weight_only else activation.name)
        object.__setattr__(self, "weight_format", weight.name)
        if activation is not None and activation.bits != 8:
            raise ConfigError(f"activation_format={activation.name!r}: activations run 8-bit formats (int8, "
                              "fp8_e4m3, fp8_e5m2), or 'none' for weight-only")
        if weight.bits == 8:
            if weight_only:
                raise ConfigError(f"weight-only with {weight.name} weights: weight-only GEMMs take packed 4-/6-bit "
                                  "formats (fp6_e3m2, int4, fp4_e2m1)")
            if activation.kind != weight.kind:
                raise ConfigError(f"activation_format={activation.name!r} with weight_format={weight.name!r}: an "
                                  "8-bit GEMM multiplies two integer or two float formats, not one of each")
        else:
            self.weight_scheme  # noqa: B018  (validates the packed-weight fields)
            if weight_only and (self.attention or self.embeddings):
                raise ConfigError("weight-only modes quantize GEMM weights; attention and embeddings need an "
                                  "activation format")
        if self.weight_search not in ("none", "grid"):
            raise ConfigError(f"weight_search={self.weight_search!r}: use 'none' or 'grid'")
        if weight.bits == 8 and (self.weight_search != "none" or self.lorc_rank or self.weight_group_size
                                 or self.weight_zero_point or self.weight_rounding != "nearest"):
            raise ConfigError(f"weight_search / lorc_rank / weight_group_size / weight_zero_point / weight_rounding "
                              f"apply to packed 4- "
                              f"and 6-bit weights, not {weight.name}")
        if self.calibration_method not in ("absmax", "percentile"):
            raise ConfigError(f"calibration_method={self.calibration_method!r}: use 'absmax' or 'percentile'")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile={self.percentile}: must lie in (50, 100]")
        if self.embedding_granularity not in ("row", "tensor"):
            raise ConfigError(f"embedding_granularity={self.embedding_granularity!r}: use 'row' or 'tensor'")
        if self.smoothing not in (None, "auto", "percentile") and not (
                isinstance(self.smoothing, (int, float)) and 0.0 < self.smoothing < 1.0):
            raise ConfigError(f"smoothing={self.smoothing!r}: the migration strength must lie in (0, 1), or 'auto', "
                              "'percentile' or None")
        if self.fwq_activations not in ("auto", "static", "per_token"):
            raise ConfigError(f"fwq_activations={self.fwq_activations!r}: use 'auto', 'static' or 'per_token'")
        if self.softmax_scale is not None and not 0.0 < self.softmax_scale <= 1.0:
            raise ConfigError(f"softmax_scale={self.softmax_scale}: must lie in (0, 1]")

    @property
    def activations(self) -> Format:
        if self.weight_only:
            raise ConfigError(f"mode {self.name} is weight-only: its activations stay float")
        return get_format(self.activation_format)

    @property
    def weight_only(self) -> bool:
        return self.activation_format == "none"

    @property
    def weights(self) -> Format:
        return get_format(self.weight_format)

    @property
    def weight_scheme(self) -> WeightScheme | None:
        """How packed (4-/6-bit) weights are stored; None for 8-bit weights."""
        fmt = self.weights
        if fmt.bits == 8:
            return None
        if not self.weight_only and fmt.name not in ("int4", "fp4_e2m1"):
            raise ConfigError(f"{self.activation_format} activations with {fmt.name} weights: a quantized GEMM takes "
                              "4-bit weights (INT4 with INT8 activations: A8W4; INT4/FP4 with FP8: W4A8); "
                              f"{fmt.name} runs weight-only (activation_format='none', e.g. mode W6A16)")
        group_scales = self.group_scales
        if group_scales == "auto":
            group_scales = ("none" if self.weight_only else
                            "integer" if self.activations.kind == "int" else "power_of_two_ratio")
        group_size = self.weight_group_size if self.weight_group_size is not None else (
            0 if group_scales == "none" else fmt.group_size or 0)
        zero_point = self.weight_zero_point if self.weight_zero_point is not None else group_scales == "integer"
        scheme = WeightScheme(fmt.name, group_size, group_scales, zero_point, self.weight_search, self.lorc_rank,
                              self.weight_rounding)
        if not self.weight_only:
            kind_needed = "integer" if self.activations.kind == "int" else "exponent"
            if scheme.group_scale_kind not in (kind_needed,):
                raise ConfigError(
                    f"{self.activations.name} activations with {fmt.name} weights and group_scales="
                    f"{group_scales!r}: one {self.activations.name} GEMM needs "
                    + ("integer group scales (DGQ: INT4 -> INT8)" if kind_needed == "integer" else
                       "power-of-two group scales (ZeroQuant-FP: 4-bit -> FP8 by an exponent shift)"))
        return scheme

    @property
    def probability_scale(self) -> float:
        return self.softmax_scale if self.softmax_scale is not None else 1.0 / self.activations.max_value

    @property
    def needs_calibration(self) -> bool:
        """TWQ scales are dynamic; everything else needs static scales from calibration data, smoothing needs the
        activation ranges and DGQ's grid search the GEMM inputs."""
        return self.fwq_gemms and not self.weight_only or self.attention or (
            (isinstance(self.smoothing, (int, float)) or self.smoothing == "percentile") and self.norm_fed_gemms) \
            or self.weight_search == "grid" or self.weight_rounding == "gptq"

    def smoothing_for(self, decoder: bool) -> float | str | None:
        """The migration strength (or "percentile") this config applies to a graph (a decoder step graph or not)."""
        if self.weight_only:
            return None
        if self.smoothing == "auto":
            return DECODER_SMOOTHING if decoder and self.norm_fed_gemms else None
        return self.smoothing if self.norm_fed_gemms else None

    @property
    def quantizes(self) -> bool:
        return self.norm_fed_gemms or self.fwq_gemms or self.attention or self.embeddings

    def replace(self, **changes) -> "QuantConfig":
        return dataclasses.replace(self, **changes)


_SITES = {
    "M1": dict(norm_fed_gemms=True),
    "M2": dict(norm_fed_gemms=True, fwq_gemms=True),
    "M3": dict(norm_fed_gemms=True, fwq_gemms=True, attention=True, embeddings=True),
}

MODES: dict[str, QuantConfig] = {"fp": QuantConfig(name="fp")}
for _mode, _sites in _SITES.items():
    MODES[_mode] = QuantConfig(name=_mode, **_sites)
    MODES[f"{_mode}-fp8"] = QuantConfig(name=f"{_mode}-fp8", activation_format="fp8_e4m3",
                                       weight_format="fp8_e4m3", **_sites)
# The related papers' formats on HERO's GEMM sites (M2: every GEMM but the output heads); docs/formats.md.
MODES["W4A8"] = QuantConfig(  # ZeroQuant-FP: FP8 E4M3 activations, FP4 E2M1 weights, power-of-two ratios, LoRC 8
    name="W4A8", activation_format="fp8_e4m3", weight_format="fp4_e2m1", weight_group_size=64,
    group_scales="power_of_two_ratio", lorc_rank=8, **_SITES["M2"])
MODES["A8W4"] = QuantConfig(  # DGQ: INT8 activations, uint4 weights with integer group scales, grid search, smoothing
    name="A8W4", activation_format="int8", weight_format="int4", weight_group_size=64, group_scales="integer",
    weight_search="grid", smoothing="percentile", **_SITES["M2"])
MODES["W6A16"] = QuantConfig(  # ZeroQuant(4+2): FP6 E3M2 weights per channel, float activations
    name="W6A16", activation_format="none", weight_format="fp6_e3m2", **_SITES["M2"])
_ALIASES = {"fp6": "W6A16", "w4a8-fp4": "W4A8", "a8w4-int4": "A8W4"}


def resolve_mode(mode) -> QuantConfig:
    """A QuantConfig from a preset name ("M3", "m2-fp8", "W4A8"), "<preset>-<format>" for any 8-bit format
    ("M3-fp8_e5m2", "M1-int8") or another weight format of a packed preset ("W4A8-int4"), any of those with field
    changes after "+" ("W4A8+lorc_rank=0", "A8W4+weight_search=none+smoothing=none"; values: integers, floats, none,
    true/false or text), or a QuantConfig."""
    if isinstance(mode, QuantConfig):
        return mode
    if isinstance(mode, str) and "+" in mode:
        base, *changes = mode.strip().split("+")
        return resolve_mode(base).replace(name=mode.strip(), **dict(_field_change(c, mode) for c in changes))
    if isinstance(mode, str):
        text = mode.strip()
        key = {m.lower(): m for m in MODES}.get(_ALIASES.get(text.lower(), text).lower())
        if key is not None:
            return MODES[key]
        base, _, fmt = text.partition("-")
        packed = {m.lower(): m for m in ("W4A8", "A8W4", "W6A16")}.get(base.lower())
        if packed is not None and fmt:  # "W4A8-int4": the preset with another weight format
            name = get_format(fmt).name
            return MODES[packed].replace(name=f"{packed}-{name}", weight_format=name)
        preset = {m.lower(): m for m in _SITES}.get(base.lower())
        if preset is not None and fmt:
            name = get_format(fmt).name  # ConfigError names the known formats
            return QuantConfig(name=f"{preset}-{name}", activation_format=name, weight_format=name, **_SITES[preset])
    raise ConfigError(f"unknown mode {mode!r}: use one of {', '.join(MODES)} (also {', '.join(_ALIASES)}), "
                      "'<M1|M2|M3>-<format>' or a QuantConfig")


def _field_change(text: str, mode: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    fields = {f.name: f.type for f in dataclasses.fields(QuantConfig) if f.name != "name"}
    if not sep or key not in fields:
        raise ConfigError(f"mode {mode!r}: {text!r} is not a field change '<field>=<value>'; fields are "
                          f"{', '.join(sorted(fields))}")
    raw = raw.strip()
    if fields[key] == "str":  # a text-only field: "none" is a value ("weight_search=none"), not None
        return key, raw
    lowered = raw.lower()
    if lowered in ("none", "null"):
        return key, None
    if lowered in ("true", "false"):
        return key, lowered == "true"
    for parse in (int, float):
        try:
            return key, parse(raw)
        except ValueError:
            pass
    return key, raw


def resolve_overrides(overrides) -> dict[str, str]:
    """Validate {module-path glob: precision}; precisions are 'fp32', 'fp16', 'bf16' (stay float), or a format name
    ('int8', 'fp8_e4m3', ...: quantize in that format where the mode quantizes)."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"overrides must be a dict of module-path glob -> precision, got {type(overrides).__name__}")
    checked = {}
    for pattern, precision in overrides.items():
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"override {pattern!r} is not a module-path glob")
        p = str(precision).strip().lower()
        if p not in FLOAT_PRECISIONS:
            try:
                fmt = get_format(p)
            except ConfigError:
                raise ConfigError(f"override {pattern!r}: precision {precision!r} is not one of "
                                  f"{', '.join(FLOAT_PRECISIONS)} or an 8-bit format name") from None
            if fmt.bits != 8:
                raise ConfigError(f"override {pattern!r}: {fmt.name} is not an 8-bit format")
            p = fmt.name
        checked[pattern] = p
    return checked
