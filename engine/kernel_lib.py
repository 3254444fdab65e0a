"""Building and loading the CPU kernels' shared library (engine/csrc/cpu_kernels.c; what they do
is engine/cpu_kernels.py).

The C source is compiled on first use with the system C compiler (`CC`, default `cc`) into a
cache directory (`PDSERVE_KERNEL_DIR`, default `~/.cache/pdserve/kernels`), named by a digest of
the source and flags (atomic rename: processes building at once each install a whole file), and
loaded with ctypes. Tried once per process; `why_not()` says why when it cannot be had.
`python -m pdserve.engine.cpu_kernels [--build]` builds ahead of time (the image build does).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

log = logging.getLogger("pdserve.engine.cpu_kernels")

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.c"
# one library from these (greedy_head.c calls cpu_kernels.c's exact row products)
SOURCES = (SOURCE, SOURCE.with_name("greedy_head.c"))
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-shared",
         "-fPIC", "-lm"]
_ABI = 4


Fields = Sequence[tuple[str, Any]]  # a ctypes.Structure's (name, C type) list


class QWeightStruct(ctypes.Structure):
    _fields_: ClassVar[Fields] = [("kind", ctypes.c_int), ("n", ctypes.c_int), ("k", ctypes.c_int),
                ("blocks", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class LlamaLayerStruct(ctypes.Structure):
    _fields_: ClassVar[Fields] = [("in_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p),
                ("qkv", QWeightStruct), ("o", QWeightStruct), ("gate_up", QWeightStruct),
                ("down", QWeightStruct)]


class DecodeStepStruct(ctypes.Structure):
    _fields_: ClassVar[Fields] = [
                ("h", ctypes.c_void_p), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p),
                ("kv", ctypes.c_void_p), ("slot_pages", ctypes.c_void_p),
                ("slot_offsets", ctypes.c_void_p), ("q_rows", ctypes.c_void_p),
                ("ctx_lens", ctypes.c_void_p), ("table_off", ctypes.c_void_p),
                ("tables", ctypes.c_void_p), ("scratch", ctypes.c_void_p),
                ("page_stride", ctypes.c_longlong), ("eps", ctypes.c_float),
                ("scale", ctypes.c_float)] + [(n, ctypes.c_int) for n in (
                    "T", "D", "H", "KVH", "hd", "I", "L", "Bt", "nthreads", "kv_f16")]


class _Kernel:
    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self.qlinear = lib.pdserve_qlinear
        self.qlinear.restype = ctypes.c_int
        self.qlinear.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                 ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.c_int]
        self.dequant = lib.pdserve_dequant
        self.dequant.restype = ctypes.c_int
        self.dequant.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                 ctypes.c_void_p]
        self.fp8_linear = lib.pdserve_fp8_linear
        self.fp8_linear.restype = ctypes.c_int
        self.fp8_linear.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                    ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        self.fp8_dequant = lib.pdserve_fp8_dequant
        self.fp8_dequant.restype = ctypes.c_int
        self.fp8_dequant.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                     ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                     ctypes.c_void_p]
        self.layer = lib.pdserve_llama_decode_layer
        self.layer.restype = ctypes.c_int
        self.layer.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        sizes = (ctypes.c_longlong * 3)()
        lib.pdserve_llama_struct_sizes(sizes)
        want = [ctypes.sizeof(c) for c in (QWeightStruct, LlamaLayerStruct, DecodeStepStruct)]
        if list(sizes) != want:
            raise RuntimeError(f"struct sizes differ between C {list(sizes)} and ctypes {want}")
        self.layer_timers = lib.pdserve_layer_timers
        self.layer_timers.restype = ctypes.c_int
        self.layer_timers.argtypes = [ctypes.c_int, ctypes.c_void_p]
        self.attention = lib.pdserve_decode_attention
        self.attention.restype = ctypes.c_int
        args: list[Any] = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong,
                           ctypes.c_longlong, *[ctypes.c_int] * 5, *[ctypes.c_void_p] * 4,
                           ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
        self.attention.argtypes = args
        self.greedy_head_usable = bool(lib.pdserve_greedy_head_usable())
        self.greedy_head = lib.pdserve_greedy_head
        self.greedy_head.restype = ctypes.c_int
        self.greedy_head.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                     *[ctypes.c_void_p] * 5, ctypes.c_int,
                                     *[ctypes.c_void_p] * 2, ctypes.c_int]


_lock = threading.Lock()
_kernel: _Kernel | None = None
_tried = False
_why_not: str | None = None


def _cpu_has_features() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"CPU architecture {platform.machine()} (the kernel is for x86-64 AVX2)"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "cannot read /proc/cpuinfo to check for AVX2/FMA/F16C"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    missing = [f for f in ("avx2", "fma", "f16c") if f not in flags]
    return f"CPU lacks {', '.join(missing)}" if missing else None


def kernel_dir() -> Path:
    env = os.environ.get("PDSERVE_KERNEL_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pdserve" / "kernels"


def library_path() -> Path:
    text = b"".join(p.read_bytes() for p in SOURCES)
    digest = hashlib.sha256(text + " ".join(FLAGS).encode()).hexdigest()[:16]
    return kernel_dir() / f"cpu_kernels-{digest}.so"


def _build(path: Path) -> None:
    from pdserve.startup import phase

    phase("weight packing")  # what came before the build
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler {cc!r} on PATH (set CC)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".so.tmp", dir=path.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, "-o", tmp, *map(str, SOURCES)], capture_output=True,
                              text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-800:]}")
        os.replace(tmp, path)  # atomic: processes building at once each install a whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        phase("kernel build")


def kernel() -> _Kernel | None:
    """The loaded kernel, building it if needed; None (and why_not() says why) when it cannot
    be had. Tried once per process; once decided, no lock (every product and attention call
    asks)."""
    global _kernel, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _kernel = _load()
                _tried = True  # only now: a caller that sees it also sees _kernel
    return _kernel


def _load() -> _Kernel | None:
    global _why_not
    _why_not = _cpu_has_features()
    if _why_not is not None:
        log.info("CPU kernels not used", extra={"reason": _why_not})
        return None
    path = library_path()
    try:
        if not path.exists():
            _build(path)
        lib = ctypes.CDLL(str(path))
        if lib.pdserve_kernels_abi() != _ABI:
            raise RuntimeError(f"{path} is of another version")
        return _Kernel(lib, path)
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        _why_not = str(e)
        log.warning("CPU kernels unavailable; using float32 weights",
                    extra={"reason": _why_not, "library": str(path)})
        return None


def why_not() -> str | None:
    return _why_not



def main(argv: Sequence[str] | None = None) -> int:
    """Build (if needed) and load the kernels; say where they are or why they are not used.
    `--build`: only compile (an image build on a machine that need not run them)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--build"]:
        path = library_path()
        if not path.exists():
            _build(path)
        print(f"CPU kernels built: {path}")
        return 0
    if args:
        print("usage: python -m pdserve.engine.cpu_kernels [--build]", file=sys.stderr)
        return 2
    k = kernel()
    if k is None:
        print(f"CPU kernels not available: {why_not()}", file=sys.stderr)
        return 1
    print(f"CPU kernels: {k.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
