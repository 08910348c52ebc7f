"""zqhero_fx.eval.data on small synthetic files in the real formats (no network)."""

from __future__ import annotations

import json

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

from zqhero_fx.errors import ZqheroError  # noqa: E402
from zqhero_fx.eval import data as D  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_hf_cache(tmp_path, monkeypatch):
    # datasets reads HF_DATASETS_CACHE at import time; patch the live value too.
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


# --------------------------------------------------------------------------- Lee


def _write_lee(tmp_path, docs, matrix, encoding="utf-8"):
    cor = tmp_path / "lee.cor"
    cor.write_bytes("\n".join(docs).encode(encoding))  # no trailing newline, like the real file
    sim = tmp_path / "similarities0-1.txt"
    sim.write_text("\n".join("\t".join(f"{v:g}" for v in row) for row in matrix) + "\n")
    return cor, sim


def test_lee_similarity_parses_upper_triangle(tmp_path):
    m = [[1, 0.3, 0.24], [0, 1, 0.5], [0, 0, 1]]
    cor, sim = _write_lee(tmp_path, ["doc one.", "doc two, £3,000.", "doc three"], m, encoding="cp1252")
    docs, human = D.lee_similarity(cor, sim)
    assert docs == ["doc one.", "doc two, £3,000.", "doc three"]
    assert human.shape == (3, 3) and human.dtype == np.float64
    np.testing.assert_allclose(human, human.T)
    np.testing.assert_allclose(np.diag(human), 1.0)
    np.testing.assert_allclose(human[np.triu_indices(3, 1)], [0.3, 0.24, 0.5])


def test_lee_similarity_accepts_symmetric_matrix(tmp_path):
    m = np.array([[1, 0.3], [0.3, 1]])
    cor, sim = _write_lee(tmp_path, ["a", "b"], m)
    _, human = D.lee_similarity(cor, sim)
    np.testing.assert_allclose(human, m)


def test_lee_similarity_shape_mismatch(tmp_path):
    cor, sim = _write_lee(tmp_path, ["a", "b"], [[1, 0.3, 0.2], [0, 1, 0.1], [0, 0, 1]])
    with pytest.raises(ValueError, match="2 documents"):
        D.lee_similarity(cor, sim)


# --------------------------------------------------------------------------- Pang & Lee


def _write_pang_lee(path, rows):
    # The real file: UTF-8 BOM, every field quoted, "" escapes, sentence ends with " \n" inside quotes.
    body = "".join('"{}","{} \n"\n'.format(lab, s.replace('"', '""')) for lab, s in rows)
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    return path


ROWS = [("1" if i % 2 == 0 else "-1", f'sentence {i} with "quote" , é') for i in range(10)]


def test_polarity_split_and_columns(tmp_path):
    p = _write_pang_lee(tmp_path / "polarity-en-pang&lee2.csv", ROWS)
    dd = D.polarity(p, test_size=3)
    assert isinstance(dd, datasets.DatasetDict) and set(dd) == {"train", "test"}
    assert dd["train"].num_rows == 7 and dd["test"].num_rows == 3
    assert dd["train"].column_names == ["sentence", "label", "idx"]
    assert dd["train"].features["label"].names == ["negative", "positive"]
    perm = np.random.RandomState(0).permutation(10)
    assert list(dd["train"]["idx"]) == perm[:7].tolist() and list(dd["test"]["idx"]) == perm[7:].tolist()
    for split in dd.values():
        for r in split:
            lab, sent = ROWS[r["idx"]]
            assert r["sentence"] == sent  # BOM, quotes and trailing " \n" handled
            assert r["label"] == (1 if lab == "1" else 0)


def test_polarity_default_split_is_3000_1000(tmp_path):
    rows = [("1" if i < 2000 else "-1", f"s{i}") for i in range(4000)]
    dd = D.polarity(_write_pang_lee(tmp_path / "p.csv", rows))
    assert (dd["train"].num_rows, dd["test"].num_rows) == (3000, 1000)
    assert sorted(list(dd["train"]["idx"]) + list(dd["test"]["idx"])) == list(range(4000))


def test_polarity_rejects_bad_label(tmp_path):
    p = _write_pang_lee(tmp_path / "p.csv", [("1", "a"), ("0", "b"), ("-1", "c")])
    with pytest.raises(ValueError, match="label must be 1 or -1"):
        D.polarity(p, test_size=1)


# --------------------------------------------------------------------------- GLUE: task info


def test_task_info_table():
    assert D.task_info("SST-2") is D.GLUE_TASKS["sst2"]
    stsb = D.task_info("stsb")
    assert stsb.is_regression and stsb.num_labels == 1 and stsb.metric_names == ("pearson", "spearmanr")
    mnli = D.task_info("mnli")
    assert mnli.eval_split == "validation_matched" and mnli.num_labels == 3
    assert mnli.text_keys == ("premise", "hypothesis")
    assert D.task_info("cola").metric_names == ("matthews_correlation",)
    assert D.task_info("mrpc").metric_names == ("accuracy", "f1")
    assert D.task_info("qqp").text_keys == ("question1", "question2")
    assert D.task_info("qnli").text_keys == ("question", "sentence")
    for t in ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"):
        info = D.task_info(t)
        assert info.eval_split in ("validation", "validation_matched") and info.main_metric
    with pytest.raises(D.GlueDataError, match="unknown GLUE task"):
        D.task_info("squad")


# --------------------------------------------------------------------------- GLUE: local files


def test_glue_sst2_tsv(tmp_path):
    d = tmp_path / "sst"
    d.mkdir()
    (d / "train.tsv").write_text('sentence\tlabel\nit \'s a " charming journey\t1\nNA\t0\n123\t1\n')
    (d / "dev.tsv").write_text("sentence\tlabel\ngood movie\t1\nbad\t0\n")
    (d / "test.tsv").write_text("index\tsentence\n5\tunlabelled\n")
    dd, info = D.glue("sst2", d)
    assert info.name == "sst2" and set(dd) == {"train", "validation", "test"}
    tr = dd["train"]
    assert list(tr["sentence"]) == ['it \'s a " charming journey', "NA", "123"]  # no NaN / int coercion
    assert list(tr["label"]) == [1, 0, 1] and list(tr["idx"]) == [0, 1, 2]
    assert tr.features["label"].names == ["negative", "positive"]
    assert tr.features["idx"] == datasets.Value("int32")
    assert list(dd["validation"]["sentence"]) == ["good movie", "bad"]
    assert list(dd["test"]["label"]) == [-1] and list(dd["test"]["idx"]) == [5]  # "index" -> idx
    (col,) = D.texts(dd[info.eval_split], info)
    assert col == ["good movie", "bad"]


def test_glue_mrpc_csv_hf_columns(tmp_path):
    (tmp_path / "validation.csv").write_text(
        'sentence1,sentence2,label,idx\n"A, b",c d,1,10\ne f,"g ""h""",0,11\n'
    )
    dd, info = D.glue("mrpc", tmp_path)
    v = dd["validation"]
    assert v.column_names == ["sentence1", "sentence2", "label", "idx"]
    assert list(v["sentence1"]) == ["A, b", "e f"] and list(v["sentence2"]) == ["c d", 'g "h"']
    assert list(v["label"]) == [1, 0] and list(v["idx"]) == [10, 11]
    assert info.text_keys == ("sentence1", "sentence2")


def test_glue_mrpc_original_layout_in_subdir(tmp_path):
    d = tmp_path / "MRPC"
    d.mkdir()
    (d / "dev.tsv").write_bytes(
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t7\t8\tthe cat\tthe \"cat\n0\t9\t10\tx\ty\n".encode()
    )
    dd, _ = D.glue("mrpc", tmp_path)
    v = dd["validation"]
    assert list(v["sentence1"]) == ["the cat", "x"] and list(v["sentence2"]) == ['the "cat', "y"]
    assert list(v["label"]) == [1, 0]


def test_glue_stsb_tsv_and_jsonl(tmp_path):
    (tmp_path / "dev.tsv").write_text("sentence1\tsentence2\tlabel\na\tb\t4.5\nc\td\t0.25\n")
    (tmp_path / "train.jsonl").write_text(
        "\n".join(json.dumps({"sentence1": s1, "sentence2": s2, "label": y}) for s1, s2, y in
                  [("x", "y", 1.0), ("z", "w", 3.2)]) + "\n"
    )
    dd, info = D.glue("stsb", tmp_path)
    assert info.is_regression
    assert dd["validation"].features["label"] == datasets.Value("float32")
    np.testing.assert_allclose(dd["validation"]["label"], [4.5, 0.25])
    np.testing.assert_allclose(dd["train"]["label"], [1.0, 3.2], rtol=1e-6)


def test_glue_stsb_original_score_column(tmp_path):
    (tmp_path / "dev.tsv").write_text(
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tmain\tf\t2012\t1\tnone\tnone\tA plane.\tAn air plane.\t5.000\n"
    )
    dd, _ = D.glue("stsb", tmp_path)
    v = dd["validation"]
    assert list(v["sentence1"]) == ["A plane."] and list(v["label"]) == [5.0] and list(v["idx"]) == [0]


def test_glue_mnli_text_labels(tmp_path):
    (tmp_path / "dev_matched.tsv").write_text(
        "index\tsentence1\tsentence2\tgold_label\n0\tp1\th1\tentailment\n1\tp2\th2\tcontradiction\n2\tp3\th3\tneutral\n"
    )
    (tmp_path / "dev_mismatched.tsv").write_text("premise\thypothesis\tlabel\np\th\t1\n")
    dd, info = D.glue("mnli", tmp_path)
    assert set(dd) == {"validation_matched", "validation_mismatched"}
    v = dd[info.eval_split]
    assert list(v["premise"]) == ["p1", "p2", "p3"] and list(v["label"]) == [0, 2, 1]
    assert list(dd["validation_mismatched"]["label"]) == [1]
    dd_mm, info_mm = D.glue("mnli_mismatched", tmp_path)
    assert info_mm.eval_split == "validation" and list(dd_mm["validation"]["label"]) == [1]


def test_glue_cola_headerless_original(tmp_path):
    (tmp_path / "dev.tsv").write_text("gj04\t1\t\tOur friends won't buy this analysis.\nclc95\t0\t*\tThey drank the pub.\n")
    dd, _ = D.glue("cola", tmp_path)
    v = dd["validation"]
    assert list(v["sentence"]) == ["Our friends won't buy this analysis.", "They drank the pub."]
    assert list(v["label"]) == [1, 0]


def test_glue_rte_string_labels_parquet_free(tmp_path):
    (tmp_path / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tnot_entailment\n1\tc\td\tentailment\n")
    dd, _ = D.glue("rte", tmp_path)
    assert list(dd["validation"]["label"]) == [1, 0]


def test_glue_local_errors(tmp_path):
    with pytest.raises(D.GlueDataError, match="not a directory"):
        D.glue("sst2", tmp_path / "missing")
    (tmp_path / "train.tsv").write_text("sentence\tlabel\na\t1\n")
    with pytest.raises(D.GlueDataError, match="'validation' split"):
        D.glue("sst2", tmp_path)
    (tmp_path / "dev.tsv").write_text("text\tlabel\na\t1\n")
    with pytest.raises(D.GlueDataError, match=r"needs column\(s\) \['sentence'\]"):
        D.glue("sst2", tmp_path)
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\na\tmaybe\n")
    with pytest.raises(D.GlueDataError, match="maybe"):
        D.glue("sst2", tmp_path)
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\na\t5\n")
    with pytest.raises(D.GlueDataError, match="out of range"):
        D.glue("sst2", tmp_path)
    (tmp_path / "dev.tsv").unlink()
    (tmp_path / "dev.jsonl").write_text('{"sentence": "a", "label": 7}\n')
    with pytest.raises(D.GlueDataError, match="out of range"):
        D.glue("sst2", tmp_path)
    (tmp_path / "dev.jsonl").write_text('{"sentence": "a", "label": 0.5}\n')
    with pytest.raises(D.GlueDataError, match="0.5"):
        D.glue("sst2", tmp_path)


def test_glue_hub_failure_is_a_clear_error(monkeypatch):
    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(D.GlueDataError) as ei:
        D.glue("sst2")
    msg = str(ei.value)
    assert "internet" in msg and "data_dir" in msg and "nyu-mll/glue" in msg
    assert isinstance(ei.value, ZqheroError) and isinstance(ei.value.__cause__, ConnectionError)


def test_glue_hub_call_uses_config(monkeypatch):
    seen = {}

    def fake(path, name=None, **k):
        seen.update(path=path, name=name)
        return datasets.DatasetDict()

    monkeypatch.setattr(datasets, "load_dataset", fake)
    _, info = D.glue("MNLI")
    assert seen == {"path": "nyu-mll/glue", "name": "mnli"} and info.eval_split == "validation_matched"
