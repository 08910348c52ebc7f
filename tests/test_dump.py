import json

import zqhero_fx
import zqhero_fx.dump


def test_dump_writes_code_svg_facts_and_sqnr_report(bert_traced, bert_calibration, tmp_path):
    _, gm = bert_traced("h64_l2")
    (tmp_path / "99_stale.py").write_text("old")
    zqhero_fx.convert(gm, "M3", calibration=bert_calibration, dump_dir=tmp_path)
    assert not (tmp_path / "99_stale.py").exists()
    names = sorted(p.name for p in tmp_path.iterdir())
    for stem in ("00_input", "01_canonicalize", "04_insert_qdq", "07_lower"):
        for suffix in (".py", ".svg", ".json"):
            assert stem + suffix in names
    assert (tmp_path / "00_input.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    lowered = (tmp_path / "07_lower.py").read_text()
    assert "torch.ops.zqhero.quantized_linear" in lowered and "int8" in lowered
    facts = json.loads((tmp_path / "09_clean_up.json").read_text())
    gemms = [f for f in facts if f["target"] == "zq.quantized_linear"]
    assert gemms and all(f["precision"] == "int8" and f["bound"] and f["flops"] > 0 for f in gemms)
    rows = json.loads((tmp_path / "sqnr_report.json").read_text())
    ops = {r["op"] for r in rows}
    assert {"zq.quantized_linear", "zq.quantized_attention", "zq.norm_quant", "zq.embedding_norm_quant",
            "output"} <= ops
    assert all(r["sqnr_db"] > 15 for r in rows)
    assert "| node | op |" in (tmp_path / "sqnr_report.md").read_text()


def test_dump_dir_from_environment(bert_traced, tmp_path, monkeypatch):
    _, gm = bert_traced("h64_l2")
    monkeypatch.setenv("ZQHERO_DUMP_DIR", str(tmp_path / "env"))
    zqhero_fx.convert(gm, "M1")
    assert (tmp_path / "env" / "00_input.py").exists()


def test_dumps_cost_nothing_when_off(bert_traced, monkeypatch):
    _, gm = bert_traced("h64_l2")
    monkeypatch.delenv("ZQHERO_DUMP_DIR", raising=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("a Dumper was built with dumps off")

    monkeypatch.setattr(zqhero_fx.dump, "Dumper", forbidden)
    zqhero_fx.convert(gm, "M1")
