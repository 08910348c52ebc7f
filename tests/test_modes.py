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
    (dict(weight_format="fp6"), "8-bit"),
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
