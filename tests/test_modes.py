import pytest

from zqhero_fx.errors import ConfigError
from zqhero_fx.modes import MODES, QuantConfig, resolve_mode, resolve_overrides

SITES = ("norm_fed_gemms", "fwq_gemms", "attention", "embeddings")


def test_modes_are_nested():
    on = {name: {f for f in SITES if getattr(MODES[name], f)} for name in ("fp", "M1", "M2", "M3")}
    assert on["fp"] == set() and on["fp"] < on["M1"] < on["M2"] < on["M3"]
    assert not MODES["M1"].needs_calibration and MODES["M2"].needs_calibration


def test_fp8_presets_cover_the_same_sites_in_another_format():
    for name in ("M1", "M2", "M3"):
        int8, fp8 = MODES[name], MODES[f"{name}-fp8"]
        assert {f: getattr(int8, f) for f in SITES} == {f: getattr(fp8, f) for f in SITES}
        assert (int8.activation_format, int8.weight_format) == ("int8", "int8")
        assert (fp8.activation_format, fp8.weight_format) == ("fp8_e4m3", "fp8_e4m3")
    assert MODES["M3"].probability_scale == pytest.approx(1 / 127)
    assert MODES["M3-fp8"].probability_scale == pytest.approx(1 / 448)


def test_resolve_mode_accepts_names_any_case_formats_and_configs():
    assert resolve_mode("m3") is MODES["M3"]
    assert resolve_mode("M2-FP8") is MODES["M2-fp8"]
    e5m2 = resolve_mode("M3-e5m2")
    assert e5m2.activation_format == "fp8_e5m2" and e5m2.attention and e5m2.name == "M3-fp8_e5m2"
    custom = QuantConfig(attention=True, activation_format="fp8")
    assert resolve_mode(custom) is custom and custom.activation_format == "fp8_e4m3"
    assert MODES["M2"].replace(percentile=99.9).percentile == 99.9
    with pytest.raises(ConfigError):
        resolve_mode(3)
    with pytest.raises(ConfigError, match="unknown mode"):
        resolve_mode("M9")


@pytest.mark.parametrize("bad, message", [
    (dict(calibration_method="mse"), "calibration_method"),
    (dict(percentile=20.0), "percentile"),
    (dict(embedding_granularity="col"), "embedding_granularity"),
    (dict(activation_format="int3"), "unknown number format|int3"),
    (dict(activation_format="int4"), "8-bit"),
    (dict(weight_format="fp6"), "fp6_e3m2 runs weight-only"),
    (dict(activation_format="none"), "needs a weight_format"),
    (dict(activation_format="none", weight_format="int8"), "weight-only GEMMs take packed"),
    (dict(activation_format="none", weight_format="fp6", attention=True), "attention and embeddings"),
    (dict(weight_format="int4", group_scales="power_of_two"), "integer group scales"),
    (dict(activation_format="fp8", weight_format="int4", group_scales="integer"), "power-of-two group scales"),
    (dict(weight_format="int4", weight_group_size=40), "multiple of 16"),
    (dict(weight_format="int4", lorc_rank=-2), "lorc_rank"),
    (dict(weight_search="exhaustive"), "weight_search"),
    (dict(lorc_rank=8), "packed 4- and 6-bit"),
    (dict(smoothing="median"), "smoothing"),
    (dict(activation_format="fp8_e4m3", weight_format="int8"), "integer or two float"),
    (dict(softmax_scale=2.0), "softmax_scale"),
])
def test_bad_config_values(bad, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig(**bad)


def test_unknown_format_in_a_mode_name_is_named():
    with pytest.raises(ConfigError, match="int3"):
        resolve_mode("M3-int3")


def test_overrides_validation():
    assert resolve_overrides({"a.*": "FP16"}) == {"a.*": "fp16"}
    assert resolve_overrides({"a.*": "fp8"}) == {"a.*": "fp8_e4m3"}
    with pytest.raises(ConfigError, match="not a module-path glob"):
        resolve_overrides({"": "fp16"})
    with pytest.raises(ConfigError, match="dict"):
        resolve_overrides(["a.*"])
    with pytest.raises(ConfigError, match="8-bit"):
        resolve_overrides({"a.*": "int4"})
    with pytest.raises(ConfigError, match="precision 'int7'"):
        resolve_overrides({"a.*": "int7"})


def test_packed_presets_are_the_papers_schemes():
    w4a8, a8w4, w6a16 = MODES["W4A8"], MODES["A8W4"], MODES["W6A16"]
    assert (w4a8.activation_format, w4a8.weight_format) == ("fp8_e4m3", "fp4_e2m1")
    assert w4a8.weight_scheme.group_scale_kind == "exponent" and w4a8.weight_scheme.lorc_rank == 8
    assert (a8w4.activation_format, a8w4.weight_format) == ("int8", "int4")
    scheme = a8w4.weight_scheme
    assert (scheme.group_scales, scheme.zero_point, scheme.search) == ("integer", True, "grid")
    assert a8w4.smoothing == "percentile" and a8w4.smoothing_for(decoder=False) == "percentile"
    assert w6a16.weight_only and w6a16.weight_scheme.group_size == 0 and not w6a16.needs_calibration
    assert w6a16.smoothing_for(decoder=True) is None
    for name in ("W4A8", "A8W4", "W6A16"):  # every GEMM site, attention and tables float
        assert MODES[name].norm_fed_gemms and MODES[name].fwq_gemms
        assert not MODES[name].attention and not MODES[name].embeddings
    assert MODES["M3"].weight_scheme is None


def test_mode_names_take_field_changes_and_weight_formats():
    assert resolve_mode("fp6") is MODES["W6A16"]
    int4 = resolve_mode("W4A8-int4")
    assert int4.weight_format == "int4" and int4.weight_scheme.group_scale_kind == "exponent"
    ablation = resolve_mode("A8W4+weight_search=none+smoothing=none")
    assert ablation.name == "A8W4+weight_search=none+smoothing=none"
    assert ablation.weight_search == "none" and ablation.smoothing is None and ablation.weight_zero_point is None
    assert resolve_mode("W4A8+lorc_rank=0").lorc_rank == 0
    assert resolve_mode("M2+percentile=99.9+calibration_method=percentile").percentile == 99.9
    with pytest.raises(ConfigError, match="not a field change"):
        resolve_mode("W4A8+lorc=3")
    with pytest.raises(ConfigError, match="lorc_rank"):
        resolve_mode("W4A8+lorc_rank=-1")
