"""The coverage report: every GEMM / attention / embedding site with its precision, format, scheme and the reason it
stays float; convert warns when a quantizing mode leaves GEMMs float (strict=True raises), and says so when a model
has nothing to quantize."""

import json
import warnings

import pytest
import torch
import torch.nn as nn

import zqhero_fx


def test_report_lists_every_site_with_format_and_scheme(bert_traced, bert_calibration):
    _, gm = bert_traced("h64_l2")
    q = zqhero_fx.convert(gm, "M3", calibration=bert_calibration)
    coverage = zqhero_fx.coverage_of(q)
    assert coverage.counts() == {"gemm": (13, 13), "attention": (2, 2), "embedding": (3, 3)}
    schemes = {s.module.removeprefix("encoder.layer.0."): s.scheme for s in coverage.sites
               if s.module.startswith("encoder.layer.0.")}
    assert schemes == {"attention.self.query": "twq", "attention.self.key": "twq", "attention.self.value": "twq",
                       "attention.self": "sq(q,k)+fwq(v)+sq(p)", "attention.output.dense": "fwq",
                       "intermediate.dense": "twq", "output.dense": "fwq"}
    assert {s.precision for s in coverage.sites} == {"int8"}
    table = coverage.table()
    assert "encoder.layer.1.output.dense" in table and "| int8 | fwq |" in table
    assert json.loads(coverage.to_json())["counts"]["gemm"] == [13, 13]


def test_fp8_mode_reports_its_format(bert_traced, bert_calibration):
    _, gm = bert_traced("h64_l2")
    q = zqhero_fx.convert(gm, "M2-fp8", calibration=bert_calibration)
    coverage = zqhero_fx.coverage_of(q)
    assert {s.precision for s in coverage.of_kind("gemm")} == {"fp8_e4m3"}
    assert all(not s.quantized and s.by_design for s in coverage.of_kind("attention"))


def test_mode_definition_and_overrides_are_reasons_not_warnings(bert_traced, bert_calibration):
    _, gm = bert_traced("h64_l2")
    with warnings.catch_warnings():
        warnings.simplefilter("error", zqhero_fx.CoverageWarning)
        q = zqhero_fx.convert(gm, "M1", calibration=bert_calibration, overrides={"encoder.layer.1.*": "fp16"})
    reasons = zqhero_fx.coverage_of(q).reasons()
    assert reasons["override fp16"] == 6
    assert any("does not quantize them (FWQ" in r for r in reasons)


class _LinearFirst(nn.Module):
    """A GEMM on the raw input: no norm, no GEMM before it, so no HERO scheme applies."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.norm, self.out = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 16)

    def forward(self, x):
        return self.out(self.norm(self.inp(x))).relu()


def test_gemms_left_float_warn_with_count_and_reason():
    model = _LinearFirst().eval()
    gm = zqhero_fx.trace(model, (torch.randn(2, 5, 8),))
    with pytest.warns(zqhero_fx.CoverageWarning, match=r"quantized 1/2 gemms.*1 x input produced by graph input"):
        zqhero_fx.convert(gm, "M1")
    with pytest.raises(zqhero_fx.CoverageError, match="input produced by graph input"):
        zqhero_fx.convert(gm, "M1", strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", zqhero_fx.CoverageWarning)
        zqhero_fx.convert(gm, "fp")  # the float mode quantizes nothing on purpose: no warning


class _PureConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(self.conv(x).relu(), 1).flatten(1)


def test_a_model_with_nothing_to_quantize_says_so():
    model = _PureConvNet().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = zqhero_fx.trace(model, (x,))
    with pytest.warns(zqhero_fx.CoverageWarning, match="nothing to quantize"):
        q = zqhero_fx.convert(gm, "M3", calibration=[(torch.randn(2, 3, 8, 8),)])
    assert zqhero_fx.coverage_of(q).sites == []
    with torch.no_grad():
        torch.testing.assert_close(q(x), model(x))


def test_coverage_of_a_module_convert_did_not_make():
    with pytest.raises(zqhero_fx.ZqheroError, match="not made by zqhero_fx.convert"):
        zqhero_fx.coverage_of(torch.fx.symbolic_trace(_PureConvNet()))


def test_dump_writes_the_report(bert_traced, bert_calibration, tmp_path):
    _, gm = bert_traced("h64_l2")
    zqhero_fx.convert(gm, "M2", calibration=bert_calibration, dump_dir=tmp_path)
    text = (tmp_path / "coverage.md").read_text()
    assert "quantized 13/13 gemms" in text and "mode M2 keeps attention float" in text
    assert json.loads((tmp_path / "coverage.json").read_text())["mode"] == "M2"


def test_report_names_the_kernels_that_run_the_model():
    import zqhero_fx
    from zqhero_fx.kernels import int8_cpu

    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    example = (torch.randn(4, 32),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", zqhero_fx.CoverageWarning)  # the first GEMM's input is the graph's input
        q = zqhero_fx.convert(zqhero_fx.trace(model, example), "M1", calibration=[example])
    coverage = zqhero_fx.coverage_of(q)
    assert coverage.kernels == f"CPU: {int8_cpu.describe()}"
    assert f"Kernels: CPU: {int8_cpu.describe()}" in coverage.table()
    assert '"kernels": "CPU: ' in coverage.to_json()
