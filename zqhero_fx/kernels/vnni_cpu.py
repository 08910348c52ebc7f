"""AVX-512 VNNI CPU kernels: the exact INT8 batched matmul `zqhero::int8_bmm`, and the fused INT8 attention kernel that
`zqhero::int8_attention` runs on CPU tensors (its launcher lives beside the op in int8_attention.py).

oneDNN's `torch._int_mm` is 2-D only, and looping it over BERT's 96 (batch x head) slices of 128x64x128 costs more in
per-call set-up than the float32 batched matmul it would replace; the attention reference therefore used float32
(exact for int8 products up to 1040 terms), at float32 speed. These kernels are one small C++ extension built on first
use with `torch.utils.cpp_extension` (then cached). Each slice's B is packed into the VNNI layout ([K/4][N][4] bytes);
A is read in place with its sign bit flipped (a + 128: `vpdpbusd` multiplies u8 by s8) and the shift is taken back
out exactly with 128 * column sums of B; 4 x 64 output tiles accumulate in 16 AVX-512 registers; slices run in
parallel on ATen's thread pool. The attention kernel runs softmax, INT8 probabilities and the epilogue between its two
tiles, four query rows at a time. The C++ is csrc/vnni_cpu.cpp (package data), compiled with CPP_FLAGS under a
name that hashes it (extension_name()).

`int8_bmm_ref` is int8_bmm's spec (an exact float64 matmul). Both kernels step aside (int8_bmm to its reference,
int8_attention to its PyTorch reference) where the CPU lacks AVX-512 VNNI, the build fails (one warning says why),
the tensors are not on the CPU, K is so long that int32 could overflow, or ZQHERO_CPU_VNNI=0.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import sysconfig
import threading
import traceback
import warnings
from pathlib import Path

import torch

# |sum| <= 255 * 128 * K before the shift is removed: int32 holds it for K <= 65792.
MAX_TERMS = (2**31 - 1) // (255 * 128)


# ---------------------------------------------------------------- reference (the spec)
def int8_bmm_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [..., M, K] int8 @ b [..., K, N] int8 -> int32, exactly (batch dims must match; float64 holds every partial
    sum exactly for K < 2**53 / 128**2, on any device)."""
    return torch.matmul(a.double(), b.double()).to(torch.int32)


# ---------------------------------------------------------------- C++ kernel (AVX-512 VNNI)
CPP_PATH = Path(__file__).resolve().parent / "csrc" / "vnni_cpu.cpp"  # shipped as package data (pyproject.toml)
# Headers every CPU kernel includes (register tiles of the VNNI kernels; the thread-pool wrapper): part of each hash.
SHARED_HEADERS = [CPP_PATH.parent / "vnni_tiles.h", CPP_PATH.parent / "cpu_parallel.h"]
CPP_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-fopenmp"]
LD_FLAGS = ["-fopenmp"]
_build_lock = threading.Lock()
log = logging.getLogger(__name__)


def __getattr__(name: str):
    if name == "CPP_SOURCE":  # the kernel's C++ text (it used to live here as a string); read on demand
        return CPP_PATH.read_text()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def extension_name() -> str:
    """The extension's module name: a hash of the .cpp (and the flags) in it, so that an edited source never loads a
    stale build cached under TORCH_EXTENSIONS_DIR."""
    return f"zqhero_vnni_cpu_{source_digest([CPP_PATH, *SHARED_HEADERS], CPP_FLAGS + LD_FLAGS)}"


def source_digest(paths, flags) -> str:
    """12 hex digits of the sources' and headers' text and the flags: part of an extension's name, so that an edited
    source or header never loads a stale build cached under TORCH_EXTENSIONS_DIR."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    digest.update(" ".join(flags).encode())
    return digest.hexdigest()[:12]


# ---------------------------------------------------------------- CPU features
@functools.cache  # read once: the kernels ask on every call, and the file takes ~60 us to parse
def _cpuinfo() -> tuple[set[str], str]:
    """(flags, model name) of the first CPU in /proc/cpuinfo; empty where it cannot be read (not Linux)."""
    flags: set[str] = set()
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "flags" and not flags:
                    flags = set(value.split())
                elif key == "model name" and not model:
                    model = value.strip()
                if flags and model:
                    break
    except OSError:
        pass
    return flags, model


def cpu_has_vnni() -> bool:
    """Whether /proc/cpuinfo lists AVX-512 F, BW and VNNI (what the kernels are compiled for)."""
    return {"avx512f", "avx512bw", "avx512_vnni"} <= _cpuinfo()[0]


def cpu_features() -> dict:
    """The CPU's model name and the INT8-relevant ISA extensions (from /proc/cpuinfo), for reports:
    {"model": str, "avx2": bool, "avx512f": bool, "avx512bw": bool, "avx512_vnni": bool, "amx_int8": bool}."""
    flags, model = _cpuinfo()
    features: dict = {"model": model or platform.processor() or platform.machine() or "unknown"}
    features.update({flag: flag in flags for flag in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_int8")})
    return features


# ---------------------------------------------------------------- building
def _raised_by_distutils_hack(error: BaseException) -> bool:
    return isinstance(error, AssertionError) and any(
        "_distutils_hack" in frame.filename for frame in traceback.extract_tb(error.__traceback__))


def _import_cpp_extension():
    """torch.utils.cpp_extension, which imports setuptools, even where setuptools' distutils shim would refuse.

    On Python < 3.12 the `distutils-precedence.pth` shim (`_distutils_hack`) makes `import setuptools` swap in
    setuptools' vendored distutils and then *asserts* that `distutils.core` came from it. Its finder stops providing
    that copy for the rest of the process as soon as anything looks up `pip`: `import pip`, or merely
    `importlib.util.find_spec("pip")` (DistutilsMetaFinder.spec_for_pip sets `spec_for_distutils = lambda: None`, so pip
    gets the stdlib distutils). zqhero's own asset fetcher does that lookup (eval/assets.py `_pip_available`) before a
    fresh machine's first run downloads its data, so the first `import setuptools` after it (this build) failed with
    `AssertionError: .../python3.11/distutils/core.py`; later runs, with the assets cached, built fine. Plain import
    orders of setuptools / distutils / transformers / torch._inductor do not trigger it. (A `pybuilddir.txt` in the
    working directory disables the shim the same way.)

    The fix: if the first import fails inside `_distutils_hack`, import again with SETUPTOOLS_USE_DISTUTILS=stdlib,
    which tells the shim not to swap (setuptools then runs on the stdlib distutils the shim already loaded, which is
    exactly what it intends once pip was seen; cpp_extension's ninja build needs nothing else from it). The variable
    is set for that one import only: the shim reads it once, when setuptools is first imported, and child processes
    (pip, compilers) should not inherit it. Normal runs never take this path and keep setuptools' own distutils.
    """
    try:
        import torch.utils.cpp_extension as cpp_extension
    except AssertionError as error:
        if not _raised_by_distutils_hack(error) or sys.version_info >= (3, 12):
            raise
        log.info("zqhero: setuptools' distutils shim is disabled in this process (pip was looked up); "
                 "importing setuptools with SETUPTOOLS_USE_DISTUTILS=stdlib")
        previous = os.environ.get("SETUPTOOLS_USE_DISTUTILS")
        os.environ["SETUPTOOLS_USE_DISTUTILS"] = "stdlib"
        try:
            with warnings.catch_warnings():  # the shim's "reliance on stdlib distutils is deprecated" notices
                warnings.filterwarnings("ignore", message=".*distutils", category=UserWarning)
                warnings.filterwarnings("ignore", message=".*distutils", category=DeprecationWarning)
                import torch.utils.cpp_extension as cpp_extension
        finally:
            if previous is None:
                os.environ.pop("SETUPTOOLS_USE_DISTUTILS", None)
            else:
                os.environ["SETUPTOOLS_USE_DISTUTILS"] = previous
    return cpp_extension


def _build_hint(error: BaseException) -> str:
    """What to do about a failed build, as far as it can be told from here."""
    text = str(error)
    compiler = os.environ.get("CXX", "c++")
    if isinstance(error, ImportError) and "setuptools" in text:
        return "install setuptools (`pip install setuptools`), which torch.utils.cpp_extension needs"
    if _raised_by_distutils_hack(error):
        return ("setuptools' distutils shim refused to load; set SETUPTOOLS_USE_DISTUTILS=stdlib, or import setuptools "
                "before anything imports pip or distutils")
    if "ninja" in text.lower() and shutil.which("ninja") is None:
        return "install ninja (`pip install ninja`, or your OS package `ninja-build`) and make sure it is on PATH"
    if shutil.which(compiler) is None:
        return (f"no C++ compiler found (`{compiler}` is not on PATH): install g++ (e.g. `apt-get install g++` or "
                f"`build-essential`), or point CXX at one")
    include = sysconfig.get_paths().get("include", "")
    if include and not os.path.exists(os.path.join(include, "Python.h")):
        return f"the Python development headers are missing ({include}/Python.h): install python3-dev / python3-devel"
    return ("a compiler with AVX-512 VNNI support (GCC >= 8 or Clang >= 6) is needed; the compiler output is in the "
            "message above, and the build directory under TORCH_EXTENSIONS_DIR "
            f"({os.environ.get('TORCH_EXTENSIONS_DIR') or '~/.cache/torch_extensions'})")


def _shorten(text: str, head: int = 200, tail: int = 500) -> str:
    """A long build error's start (the failing step) and end (the compiler's diagnostic)."""
    text = " ".join(text.split())
    return text if len(text) <= head + tail + 5 else f"{text[:head]} ... {text[-tail:]}"


def build_extension(name: str, source: Path | list[Path], cflags, ldflags, what: str, fallback: str, switch: str,
                    hint=None):
    """Build (or load the cached) C++ extension `name` from `source` (one file or several) with
    torch.utils.cpp_extension; None, with one
    warning naming the cause, the fix (`hint(error)`, default _build_hint) and the switch, when it cannot be built.
    Every CPU kernel of the package builds through here, under one lock."""
    with _build_lock:
        try:
            cpp_extension = _import_cpp_extension()
            if shutil.which("ninja") is None:  # the `ninja` wheel's binary, when its scripts dir is not on PATH
                import ninja

                os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
            log.info(f"zqhero: building (or loading the cached) {what}")
            # copies: cpp_extension.load appends torch's libraries to the lists it is given
            sources = [str(path) for path in (source if isinstance(source, (list, tuple)) else [source])]
            return cpp_extension.load(name=name, sources=sources, extra_cflags=list(cflags),
                                      extra_ldflags=list(ldflags), verbose=False)
        except Exception as error:  # no compiler / ninja / setuptools: stay correct, just slower
            warnings.warn(f"zqhero: the {what} did not build ({type(error).__name__}: {_shorten(str(error))}); "
                          f"{fallback}. To fix: {(hint or _build_hint)(error)}. Set {switch}=0 to skip it and "
                          "silence this warning.", RuntimeWarning, stacklevel=3)
            return None


@functools.cache
def extension():
    """The compiled module, or None (with one warning saying why) where it cannot be used here."""
    if os.environ.get("ZQHERO_CPU_VNNI", "1").strip() == "0" or not cpu_has_vnni():
        return None
    return build_extension(extension_name(), CPP_PATH, CPP_FLAGS, LD_FLAGS, "AVX-512 VNNI CPU kernels",
                           "CPU attention runs its PyTorch reference instead (slower)", "ZQHERO_CPU_VNNI")


def as_4d(t: torch.Tensor) -> torch.Tensor:
    """Leading size-1 dims up to 4-D (the kernels take [B1, B2, rows, cols] operands)."""
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def fast_path_applies(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the VNNI kernel takes a @ b (shapes and devices; the operands must also be, or become, int8)."""
    return (a.device.type == "cpu" and b.device.type == "cpu" and 2 <= a.dim() <= 4 and a.dim() == b.dim()
            and a.shape[:-2] == b.shape[:-2] and a.shape[-1] == b.shape[-2] and a.shape[-1] <= MAX_TERMS
            and extension() is not None)


def int8_bmm_impl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"zqhero::int8_bmm takes int8 operands, got {a.dtype} and {b.dtype}")
    if not fast_path_applies(a, b):
        return int8_bmm_ref(a, b)
    out = extension().int8_bmm(as_4d(a), as_4d(b))
    return out.reshape(*a.shape[:-1], b.shape[-1])


# ---------------------------------------------------------------- registration
@torch.library.custom_op("zqhero::int8_bmm", mutates_args=())
def int8_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 [..., M, K] @ int8 [..., K, N] -> int32 [..., M, N] (matching batch dims)."""
    return int8_bmm_impl(a, b)


@int8_bmm.register_fake
def _(a, b):
    return a.new_empty((*a.shape[:-1], b.shape[-1]), dtype=torch.int32)
