"""torch.compile(model, backend="zqhero"): same results as convert, calibration through graph breaks, no recompiles
per shape, Inductor with the zqhero ops as extern calls, the registry and entry point.

Most tests run the converted graphs without Inductor (inductor=False); test_inductor_* compiles C++ (~30 s cold)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import zqhero_fx
from tests.harness import RecordingBackend, count_ops, inductor_code
from tests.models import Block, bert_batch, encoder_batch, sqnr_db, tiny_bert
from zqhero_fx.backend import ZqheroBackend, backend, zqhero_backend

zq = torch.ops.zqhero
REPO = Path(__file__).resolve().parents[1]
M3_OPS = [zq.quantized_linear.default, zq.norm_quant.default, zq.quantized_attention.default,
          zq.embedding_norm_quant.default]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def calibration():
    return [bert_batch(4, 24, seed=i) for i in range(3)]


_TRACED: dict = {}


def _converted(model, mode, calibration, overrides=None):
    """convert(trace(model)): what the backend must reproduce. Traces are cached per model configuration (tiny_bert
    seeds its weights, so every instance of one configuration is the same model)."""
    key = (type(model).__name__, model.config._attn_implementation)
    if key not in _TRACED:
        _TRACED[key] = zqhero_fx.trace(model, bert_batch(2, 8, seed=1))
    return zqhero_fx.convert(_TRACED[key], mode, calibration=calibration, overrides=overrides)


class TwoBlocksWithBreak(nn.Module):
    """Two encoder blocks with graph breaks between them: a print, then a branch on a tensor's value."""

    def __init__(self, width: int = 48):
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(50, width)
        self.norm_in = nn.LayerNorm(width)
        self.first, self.second = Block(width, 4, 2 * width), Block(width, 4, 2 * width)

    def forward(self, ids, keep):
        x = self.norm_in(self.tok(ids))
        bias = (1.0 - keep[:, None, None, :].float()) * -10000.0
        x = self.first(x, bias)
        print("between the blocks", end="\r")
        if bool(x.abs().amax() > 0):  # data-dependent: Dynamo cannot trace the branch
            x = self.second(x, bias)
        else:
            x = x * 2
        return x


class TwoPaths(nn.Module):
    """One encoder block or another, chosen by the first token: Dynamo compiles each path when it first runs."""

    def __init__(self, width: int = 48):
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(50, width)
        self.norm_in = nn.LayerNorm(width)
        self.a, self.b = Block(width, 4, 2 * width), Block(width, 4, 2 * width)

    def forward(self, ids, keep):
        x = self.norm_in(self.tok(ids))
        bias = (1.0 - keep[:, None, None, :].float()) * -10000.0
        return self.a(x, bias) if bool(ids[0, 0] == 0) else self.b(x, bias)


def _first_token(batch, token):
    ids, keep = batch
    ids[0, 0] = token
    return ids, keep


# ---------------------------------------------------------------- same results as convert
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_options_path_matches_convert_from_the_first_call(calibration, attn):
    model = tiny_bert("h64_l2", attn)
    reference = _converted(model, "M3", calibration)
    compiled = torch.compile(model, backend="zqhero",
                             options={"mode": "M3", "calibration": calibration, "inductor": False})
    with torch.no_grad():
        for batch, seq in [(3, 20), (1, 9)]:  # the first call feeds the calibration set, then answers
            test = bert_batch(batch, seq, pad_from=seq - 2, seed=batch)
            torch.testing.assert_close(compiled(**test).last_hidden_state, reference(**test).last_hidden_state,
                                       rtol=1e-5, atol=1e-5)
    be = ZqheroBackend.of(compiled)
    assert isinstance(be, ZqheroBackend) and be.config.name == "M3"
    # torch._dynamo.reset() (the fixture) dropped the hook that marks the first call's sizes dynamic, so Dynamo first
    # compiled a graph static in them; the calibration set then ran through a dynamic recompile, which the static
    # graph delegates to. Without a reset in between there is one graph (test_other_shapes_do_not_recompile).
    fed = [g for g in be.graphs if g.source == "calibration set"]
    assert len(fed) == 1 and fed[0].calibrated_on == len(calibration)
    assert all(g.delegate is fed[0] for g in be.graphs if g is not fed[0])
    histogram = zqhero_fx.ops_histogram(fed[0].quantized_graph)
    assert {k: v for k, v in histogram.items() if "zqhero" in k} == \
        {k: v for k, v in zqhero_fx.ops_histogram(reference).items() if "zqhero" in k}


def test_classifier_with_recording_backend(calibration):
    model = tiny_bert("h64_l2", "eager", classifier=True)
    be = backend(mode="M3", calibration=calibration, inductor=False)
    rec = RecordingBackend(be)
    compiled = torch.compile(model, backend=rec)
    test = bert_batch(4, 16, seed=2)
    with torch.no_grad():
        logits = compiled(**test).logits
        torch.testing.assert_close(logits, _converted(model, "M3", calibration)(**test).logits, rtol=1e-5, atol=1e-5)
        assert sqnr_db(model(**test).logits, logits) >= 20
    # eager attention as Dynamo spells it, fused into one INT8 attention op per layer
    rec.check_before_ops([torch._C._nn.linear, torch.nn.functional.layer_norm, torch.matmul,
                          torch.nn.functional.softmax], fully_replaced=True)
    rec.check_after_ops(M3_OPS)
    assert count_ops(rec.graphs_after, zq.quantized_linear.default) == 13  # q, k, v, out, FC1, FC2 per layer; pooler
    # Dynamo passed the weights as inputs; the frozen float graph holds them as constants named by module path
    frozen = be.graphs[0].float_graph
    targets = {n.target for n in frozen.graph.nodes if n.op == "get_attr"}
    assert "bert.encoder.layer.0.attention.self.query.weight" in targets
    assert "classifier.weight" in targets
    inputs = [n.meta["val"] for n in frozen.graph.nodes if n.op == "placeholder"]
    assert all(v.dtype == torch.int64 for v in inputs if isinstance(v, torch.Tensor))  # ids and mask, no weights


def test_m1_converts_when_dynamo_compiles():
    model = tiny_bert("h64_l2", "eager")
    rec = RecordingBackend(backend(mode="M1", inductor=False))
    compiled = torch.compile(model, backend=rec)
    assert rec.graphs_after == []
    test = bert_batch(2, 12, seed=3)
    with torch.no_grad():
        got = compiled(**test).last_hidden_state
        reference = _converted(model, "M1", None)(**test).last_hidden_state
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    rec.check_after_ops([zq.quantized_linear.default, zq.norm_quant.default])
    rec.check_absent_ops([zq.quantized_attention.default])


def test_without_calibration_set_first_calls_calibrate():
    model = tiny_bert("h64_l2", "sdpa")
    be = backend(mode="M2", calibration_calls=3, inductor=False)
    compiled = torch.compile(model, backend=be)
    seen = [bert_batch(2 + i, 10 + 3 * i, seed=10 + i) for i in range(3)]
    with torch.no_grad():
        for batch in seen:  # runs float while recording
            torch.testing.assert_close(compiled(**batch).last_hidden_state, model(**batch).last_hidden_state)
        assert be.graphs[0].converted and be.graphs[0].source == "first calls"
        test = bert_batch(3, 14, seed=20)
        got = compiled(**test).last_hidden_state
        # the three calls it saw are exactly a calibration set for convert
        reference = _converted(model, "M2", seen)(**test).last_hidden_state
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, model(**test).last_hidden_state)


def test_explicit_calibrate_before_the_first_call(calibration):
    model = tiny_bert("h64_l2", "sdpa")
    be = backend(mode="M3", calibration=calibration, inductor=False)
    compiled = torch.compile(model, backend=be)
    assert ZqheroBackend.of(compiled) is be
    with torch.no_grad():
        be.calibrate(compiled)
        assert [g.converted for g in be.graphs] == [True]
        test = bert_batch(2, 9, seed=4)
        torch.testing.assert_close(compiled(**test).last_hidden_state,
                                   _converted(model, "M3", calibration)(**test).last_hidden_state, rtol=1e-5, atol=1e-5)
    assert len(be.graphs) == 1


# ---------------------------------------------------------------- graph breaks, shapes, grad mode
def test_graph_breaks_each_graph_calibrated_on_what_it_sees():
    model = TwoBlocksWithBreak().eval()
    calibration = [encoder_batch(4, 16, seed=i) for i in range(3)]
    be = backend(mode="M3", calibration=calibration, inductor=False)
    rec = RecordingBackend(be)
    compiled = torch.compile(model, backend=rec)
    with torch.no_grad():
        for batch, seq in [(2, 8), (3, 12), (1, 7)]:
            test = encoder_batch(batch, seq, seed=9)
            assert sqnr_db(model(*test), compiled(*test)) >= 25
    assert rec.compiles == 3  # before the print, up to the branch, after it; and no more for other shapes
    assert [(g.converted, g.calibrated_on, g.source) for g in be.graphs] == [(True, 3, "calibration set")] * 3
    rec.check_after_ops([zq.quantized_embedding.default, zq.quantized_linear.default, zq.quantized_attention.default], graph=0)
    rec.check_after_ops([zq.quantized_linear.default, zq.quantized_attention.default], graph=2)


def test_graph_compiled_after_calibration_calibrates_on_its_first_calls():
    model = TwoPaths().eval()
    calibration = [_first_token(encoder_batch(4, 16, seed=i), 1) for i in range(2)]  # path b only
    be = backend(mode="M2", calibration=calibration, calibration_calls=2, inductor=False)
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        for i in range(3):  # path a: compiled after the calibration set was fed
            test = _first_token(encoder_batch(3, 10, seed=20 + i), 0)
            got = compiled(*test)
            if i < 2:
                torch.testing.assert_close(got, model(*test))  # float while it records
    path_a = [g for g in be.graphs if g.source == "first calls"]
    assert len(path_a) == 1 and path_a[0].calibrated_on == 2
    assert count_ops([path_a[0].quantized_graph], zq.quantized_linear.default) > 0
    with torch.no_grad():
        assert 25 <= sqnr_db(model(*test), got) < 200  # quantized now


def test_other_shapes_do_not_recompile_grad_enabled(calibration):
    model = tiny_bert("h64_l2", "sdpa")
    rec = RecordingBackend(backend(mode="M3", calibration=calibration, inductor=False))
    compiled = torch.compile(model, backend=rec)
    # grad mode is on: the calibration set is fed under the caller's grad mode, so it runs through the same graph
    for batch, seq in [(2, 8), (3, 12), (7, 40), (1, 5), (4, 127)]:
        test = bert_batch(batch, seq, seed=seq)
        got = compiled(**test).last_hidden_state
        assert got.shape == (batch, seq, 64)
    assert rec.compiles == 1
    with torch.no_grad():
        torch.testing.assert_close(got.detach(), _converted(model, "M3", calibration)(**test).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)


def test_dynamic_true_folds_module_floats(calibration):
    model = tiny_bert("h64_l2", "eager")
    be = backend(mode="M3", calibration=calibration, inductor=False)
    compiled = torch.compile(model, backend=be, dynamic=True)  # Dynamo passes eps, dropout p, scaling as inputs
    test = bert_batch(3, 10, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**test).last_hidden_state,
                                   _converted(model, "M3", calibration)(**test).last_hidden_state, rtol=1e-5, atol=1e-5)
    placeholders = [n for n in be.graphs[0].float_graph.graph.nodes if n.op == "placeholder"]
    assert not any("eps" in n.name or "dropout_p" in n.name for n in placeholders)


# ---------------------------------------------------------------- options, overrides, dumps, errors
def test_overrides_match_convert(calibration):
    model = tiny_bert("h64_l2", "sdpa")
    overrides = {"encoder.layer.1.*": "fp32"}
    be = backend(mode="M3", calibration=calibration, overrides=overrides, inductor=False)
    compiled = torch.compile(model, backend=be)
    reference = _converted(model, "M3", calibration, overrides)
    test = bert_batch(2, 10, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**test).last_hidden_state, reference(**test).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
    assert zqhero_fx.ops_histogram(be.graphs[0].quantized_graph)["zqhero.quantized_linear.default"] == 6


def test_dump_dir_per_graph(tmp_path):
    model = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)).eval()
    compiled = torch.compile(model, backend="zqhero", options={"mode": "M1", "inductor": False,
                                                              "dump_dir": str(tmp_path)})
    with torch.no_grad():
        compiled(torch.randn(2, 5, 16))
    dumped = sorted(p.name for p in (tmp_path / "graph_0").iterdir())
    assert any(name.endswith("_lower.py") for name in dumped), dumped


def test_bad_options_raise():
    model = tiny_bert("h64_l2", "sdpa")
    compiled = torch.compile(model, backend="zqhero", options={"mode": "M3", "calibraton": []})
    with pytest.raises(Exception, match="unknown zqhero option"):
        compiled(**bert_batch(2, 8))
    with pytest.raises(zqhero_fx.ConfigError, match="unknown mode"):
        backend(mode="M9")
    with pytest.raises(zqhero_fx.CalibrationError, match="iterable of batches"):
        backend(mode="M3", calibration=bert_batch(2, 8))
    with pytest.raises(zqhero_fx.ConfigError, match="calibration_calls"):
        backend(mode="M3", calibration_calls=0)
    be = backend(mode="M3", calibration=[bert_batch(2, 8)], overrides={"no.such.module": "fp32"}, inductor=False)
    with pytest.raises(Exception, match="matches no module"):
        with torch.no_grad():
            torch.compile(model, backend=be)(**bert_batch(2, 8))


def test_override_matching_nothing_names_no_internal_module(calibration):
    class WithPrivateStem(nn.Module):
        def __init__(self):
            super().__init__()
            self._stem = nn.LayerNorm(16)
            self.head = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

        def forward(self, x):
            return self.head(self._stem(x))

    be = backend(mode="M1", overrides={"body.*": "fp32"}, inductor=False)
    with pytest.raises(Exception, match="matches no module") as info:
        with torch.no_grad():
            torch.compile(WithPrivateStem().eval(), backend=be)(torch.randn(2, 5, 16))
    examples = str(info.value).split("module paths look like: ")[1].split(")")[0].split(", ")
    assert "head.0" in examples and not any(p.startswith("_") for p in examples), examples


# ---------------------------------------------------------------- Inductor
def test_inductor_with_grad_enabled(calibration):
    """torch.compile(model, backend="zqhero") with Inductor, called without torch.no_grad()."""
    model = tiny_bert("h64_l2", "sdpa")
    compiled = torch.compile(model, backend="zqhero", options={"mode": "M3", "calibration": calibration})
    test = bert_batch(2, 10, seed=3)
    assert torch.is_grad_enabled()
    got = compiled(**test).last_hidden_state
    with torch.no_grad():
        torch.testing.assert_close(got.detach(), _converted(model, "M3", calibration)(**test).last_hidden_state,
                                   rtol=1e-3, atol=1e-3)


def test_inductor_keeps_zqhero_ops_as_extern_calls(calibration):
    model = tiny_bert("h64_l2", "sdpa")
    be = backend(mode="M3", calibration=calibration)  # inductor=True
    compiled = torch.compile(model, backend=be)
    reference = _converted(model, "M3", calibration)
    with torch.no_grad():
        with inductor_code() as code:
            first = compiled(**bert_batch(2, 8, seed=8)).last_hidden_state  # calibrates, converts, compiles
        torch.testing.assert_close(first, reference(**bert_batch(2, 8, seed=8)).last_hidden_state, rtol=1e-4, atol=1e-4)
        test = bert_batch(3, 21, seed=21)
        torch.testing.assert_close(compiled(**test).last_hidden_state, reference(**test).last_hidden_state,
                                   rtol=1e-4, atol=1e-4)
    assert len(be.graphs) == 1 and len(code) == 1
    assert code[0].count("torch.ops.zqhero.quantized_linear.default(") == 13  # extern calls, one per GEMM (pooler too)
    assert code[0].count("torch.ops.zqhero.quantized_attention.default(") == 2
    assert "aten.native_layer_norm" not in code[0]  # the float LayerNorm left is one of Inductor's own kernels
    assert "cpp_fused" in code[0]


# ---------------------------------------------------------------- registry and entry point
def test_backend_reads_no_dynamo_internals_itself():
    """Freezing lives in zqhero_fx.capture (re-exported here), Dynamo internals in zqhero_fx._dynamo_compat."""
    from zqhero_fx import capture

    module = sys.modules["zqhero_fx.backend"]
    assert module.freeze is capture.freeze_dynamo_graph and module.module_path_of_source is capture.module_path_of_source
    source = Path(module.__file__).read_text()
    for internal in ("_getframe", "_COMPILER_FNS", "callback_handler", "dynamo_ctx", "__closure__", "grapharg",
                     "example_value", "backed_size_oblivious", "torch._dynamo.maybe_mark_dynamic", "eval_frame"):
        assert internal not in source, internal


def test_registered_under_its_name():
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("zqhero") is zqhero_backend


def _lookup_in_subprocess(extra_path: str | None) -> subprocess.CompletedProcess:
    code = textwrap.dedent("""
        import sys, torch
        from torch._dynamo.backends.registry import lookup_backend
        assert "zqhero_fx" not in sys.modules
        fn = lookup_backend("zqhero")
        assert fn.__module__ == "zqhero_fx.backend", fn
        model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)).eval()
        compiled = torch.compile(model, backend="zqhero", options={"mode": "M1", "inductor": False})
        with torch.no_grad():
            out = compiled(torch.randn(2, 3, 8))
        assert torch.isfinite(out).all()
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (extra_path, str(REPO)) if p))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")


def test_entry_point_resolves_without_importing_zqhero_fx(tmp_path):
    """The pyproject's torch_dynamo_backends entry point, installed (pip install -e .) or, if not, as an installed
    distribution's metadata would carry it."""
    import tomllib
    from importlib.metadata import entry_points

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["torch_dynamo_backends"]
    assert declared == {"zqhero": "zqhero_fx.backend:zqhero_backend"}
    extra = None
    if "zqhero" not in entry_points(group="torch_dynamo_backends").names:
        dist = tmp_path / "zqhero_fx_entry_point-0.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: zqhero-fx-entry-point\nVersion: 0.0\n")
        (dist / "entry_points.txt").write_text("[torch_dynamo_backends]\nzqhero = zqhero_fx.backend:zqhero_backend\n")
        extra = str(tmp_path)
    result = _lookup_in_subprocess(extra)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
