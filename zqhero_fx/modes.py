"""Quantization modes as data. M1 ⊂ M2 ⊂ M3 in INT8 coverage; these presets are zqhero_fx's own definition
(the paper's mode table is not public), written up in docs/modes.md.

| flag                | what turns INT8                                                                  | scheme |
|---------------------|----------------------------------------------------------------------------------|--------|
| int8_ln_gemms (M1+) | GEMMs fed by a LayerNorm (QKV, FC1); LayerNorm emits INT8 + per-token scales     | TWQ    |
| int8_fwq_gemms (M2+)| attention-output projection and FC2; static per-feature input scales folded into W | FWQ    |
| int8_attention (M3) | Q.K^T, softmax probabilities and P.V; QKV epilogues emit INT8 Q/K/V               | SQ (Q, K, P), FWQ (V) |
| int8_embeddings (M3)| embedding tables stored INT8 with static scales                                   | SQ/row |
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from zqhero_fx.errors import ConfigError

PRECISIONS = ("int8", "fp32", "fp16", "bf16")


@dataclass(frozen=True)
class QuantConfig:
    """What a conversion does. Build one directly, or start from a preset: `MODES["M2"].replace(percentile=99.99)`."""

    name: str = "custom"
    int8_ln_gemms: bool = False
    int8_fwq_gemms: bool = False
    int8_attention: bool = False
    int8_embeddings: bool = False
    # Static-scale statistics: "absmax" (min-max) or "percentile" (of |x| per feature, averaged over batches).
    calibration_method: str = "absmax"
    percentile: float = 99.99
    # Static per-row scales for embedding tables ("row"), or one scale per table ("tensor", plain SQ).
    embedding_granularity: str = "row"
    # Scale of the quantized softmax probabilities: exp(s - rowmax) lies in (0, 1], so 1/127 covers it exactly.
    softmax_scale: float = 1.0 / 127
    # Device whose ridge point labels nodes memory- or compute-bound (see passes/classify.py).
    device: str = "cpu"

    def __post_init__(self):
        if self.calibration_method not in ("absmax", "percentile"):
            raise ConfigError(f"calibration_method={self.calibration_method!r}: use 'absmax' or 'percentile'")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile={self.percentile}: must lie in (50, 100]")
        if self.embedding_granularity not in ("row", "tensor"):
            raise ConfigError(f"embedding_granularity={self.embedding_granularity!r}: use 'row' or 'tensor'")

    @property
    def needs_calibration(self) -> bool:
        """TWQ scales are dynamic; everything else needs static scales from calibration data."""
        return self.int8_fwq_gemms or self.int8_attention

    @property
    def quantizes(self) -> bool:
        return self.int8_ln_gemms or self.int8_fwq_gemms or self.int8_attention or self.int8_embeddings

    def replace(self, **changes) -> "QuantConfig":
        return dataclasses.replace(self, **changes)


MODES: dict[str, QuantConfig] = {
    "fp": QuantConfig(name="fp"),
    "M1": QuantConfig(name="M1", int8_ln_gemms=True),
    "M2": QuantConfig(name="M2", int8_ln_gemms=True, int8_fwq_gemms=True),
    "M3": QuantConfig(name="M3", int8_ln_gemms=True, int8_fwq_gemms=True, int8_attention=True, int8_embeddings=True),
}


def resolve_mode(mode) -> QuantConfig:
    if isinstance(mode, QuantConfig):
        return mode
    if isinstance(mode, str):
        key = {m.lower(): m for m in MODES}.get(mode.strip().lower())
        if key is not None:
            return MODES[key]
    raise ConfigError(f"unknown mode {mode!r}: use one of {', '.join(MODES)} or a QuantConfig")


def resolve_overrides(overrides) -> dict[str, str]:
    """Validate {module-path glob: precision}; precisions are 'fp32', 'fp16', 'bf16' (stay float) or 'int8'."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"overrides must be a dict of module-path glob -> precision, got {type(overrides).__name__}")
    checked = {}
    for pattern, precision in overrides.items():
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"override key {pattern!r} is not a module-path glob")
        p = str(precision).lower()
        if p not in PRECISIONS:
            raise ConfigError(f"override {pattern!r}: precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        checked[pattern] = p
    return checked
