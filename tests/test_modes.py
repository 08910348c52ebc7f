import pytest

from zqhero_fx.errors import ConfigError
from zqhero_fx.modes import MODES, QuantConfig, resolve_mode, resolve_overrides


def test_modes_are_nested():
    flags = ("int8_ln_gemms", "int8_fwq_gemms", "int8_attention", "int8_embeddings")
    on = {name: {f for f in flags if getattr(MODES[name], f)} for name in ("fp", "M1", "M2", "M3")}
    assert on["fp"] == set() and on["fp"] < on["M1"] < on["M2"] < on["M3"]
    assert not MODES["M1"].needs_calibration and MODES["M2"].needs_calibration


def test_resolve_mode_accepts_names_any_case_and_configs():
    assert resolve_mode("m3") is MODES["M3"]
    custom = QuantConfig(int8_attention=True)
    assert resolve_mode(custom) is custom
    assert MODES["M2"].replace(percentile=99.9).percentile == 99.9
    with pytest.raises(ConfigError):
        resolve_mode(3)


@pytest.mark.parametrize("bad", [dict(calibration_method="mse"), dict(percentile=20.0),
                                 dict(embedding_granularity="col")])
def test_bad_config_values(bad):
    with pytest.raises(ConfigError):
        QuantConfig(**bad)


def test_overrides_validation():
    assert resolve_overrides({"a.*": "FP16"}) == {"a.*": "fp16"}
    with pytest.raises(ConfigError, match="not a module-path glob"):
        resolve_overrides({"": "fp16"})
    with pytest.raises(ConfigError, match="dict"):
        resolve_overrides(["a.*"])
