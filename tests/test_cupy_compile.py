"""The cupy backend's CUDA sources (kernels/cuda/*.cu), checked on the CPU:

* nvcc compiles every ``kernels/cuda/*.cu`` for sm_80 and sm_90 with every template the
  backend asks NVRTC for instantiated: a small translation unit per source includes it and
  takes the address of each of the backend's name expressions, so the list cannot drift
  (skipped where nvcc is not on PATH);
* the tensor-core kernel's PTX holds mma.sync for fp16 and bf16, and its cp.async copies
  of h with a wait for each group;
* the kernels include only headers the card's NVRTC has, and the source handed to NVRTC
  inlines the shared header;
* what the Python side mirrors from the sources: the call tables' fields (recurrent.cu's
  structs) and the tensor-core kernel's shared-memory padding.

The kernels' arithmetic is checked by test_cupy_emulated.py (on the CPU) and test_cupy_gpu.py.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cupy_emulation import KERNELS, SOURCES

import rnn_gpu.backends.cupy as cb
from rnn_gpu.kernels.cuda import device as cdev
from rnn_gpu.kernels.cuda import graphs as cgraphs
from rnn_gpu.kernels.cuda import sources as csources

ARCHS = ("sm_80", "sm_90")


# ---------------------------------------------------------------------- nvcc

@pytest.fixture(scope="module")
def nvcc_builds(tmp_path_factory):
    """Every (source, arch) compile, started together (each takes 5-25 s)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH (the CUDA toolkit is needed to compile the kernels)")
    out = tmp_path_factory.mktemp("nvcc")
    procs = {}
    for src in SOURCES:
        unit = out / f"{src}_check.cu"
        unit.write_text(instantiating_unit(src))
        for arch in ARCHS:
            cmd = [nvcc, "-std=c++17", f"-arch={arch}", "-c", "-o",
                   str(out / f"{src}_{arch}.o"), str(unit)]
            procs[src, arch] = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT, text=True)
    return {key: (p.wait(timeout=600), p.stdout.read()) for key, p in procs.items()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", SOURCES)
def test_nvcc_compiles_every_instantiation(nvcc_builds, src, arch):
    code, log = nvcc_builds[src, arch]
    assert code == 0, f"nvcc failed on {src}.cu for {arch}:\n{log}"
    assert "warning" not in log.lower(), log


# Headers seen to compile under the card's NVRTC (pip's cu13 headers, H100 run 5). Its mma.h
# includes a crt/mma.h that those headers lack, so wmma failed there while nvcc here built it.
NVRTC_SYSTEM_HEADERS = {"cuda_fp16.h", "cuda_bf16.h", "cooperative_groups.h"}


def test_kernels_include_only_headers_the_cards_nvrtc_has():
    for path in sorted(KERNELS.glob("*.cu*")):
        system = set(re.findall(r"^\s*#include\s*<([\w./]+)>", path.read_text(), re.M))
        assert system <= NVRTC_SYSTEM_HEADERS, (path.name, system - NVRTC_SYSTEM_HEADERS)


def persistent_mma_ptx(tmp_path, arch: str, *options: str) -> str:
    """persistent_mma.cu with every instantiation the backend asks for, compiled by nvcc for
    ``arch`` with ``options``: its PTX (with "-c" among them, an object file; then "")."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH (the CUDA toolkit is needed to compile the kernels)")
    unit = tmp_path / "mma_check.cu"
    unit.write_text(instantiating_unit("persistent_mma"))
    out = tmp_path / ("mma_check.o" if "-c" in options else "mma_check.ptx")
    mode = [] if "-c" in options else ["-ptx"]
    done = subprocess.run([nvcc, "-std=c++17", f"-arch={arch}", *mode, *options, "-o", str(out),
                           str(unit)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return "" if "-c" in options else out.read_text()


def test_mma_kernel_runs_its_half_products_on_the_tensor_cores(tmp_path):
    """The fp16 and bf16 instantiations of persistent_mma.cu emit mma.sync m16n8k16 (PTX for
    sm_80, the oldest target): a fallback to the generic CUDA-core tile would compile too. The
    step's copy of h is cp.async in four groups, each waited for before its products."""
    text = persistent_mma_ptx(tmp_path, "sm_80")
    for kind in ("f16", "bf16"):
        assert f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32" in text, kind
    assert "cp.async.cg.shared.global" in text
    source = (KERNELS / "persistent_mma.cu").read_text()
    chunks = int(re.search(r"constexpr int MMA_K_CHUNKS = (\d+);", source).group(1))
    for pending in range(chunks):
        assert f"cp.async.wait_group {pending};" in text, pending
    # shared memory is addressed as shared memory: no generic ld/st (persistent.cuh's
    # shared_from_128; rounding the base through an integer made every access generic). The
    # grid barrier's own loads (cooperative groups: ld.acquire.gpu) are generic by design.
    generic = re.findall(r"\b(?:ld|st)\.(?!global|shared|param|local|const|acquire|release|"
                         r"relaxed|volatile)[\w.]+", text)
    assert not generic, sorted(set(generic))
    assert "ld.shared" in text and "st.shared" in text


def test_ldmatrix_variant_loads_the_fragments_with_ldmatrix(tmp_path):
    """MMA_LDMATRIX=1 (a tuning constant for .ci/phase_clocks.py): the same tensor-core
    products, their fragments loaded by ldmatrix.x4; the default build has no ldmatrix."""
    text = persistent_mma_ptx(tmp_path, "sm_80", "-DMMA_LDMATRIX=1")
    default = persistent_mma_ptx(tmp_path, "sm_80")
    assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in text and "ldmatrix" not in default
    assert text.count("mma.sync.aligned") == default.count("mma.sync.aligned") > 0


@pytest.mark.parametrize("clocks", [False, True], ids=["default", "phase-clocks"])
def test_phase_clocks_are_compiled_in_only_when_asked_for(tmp_path, clocks):
    """.ci/phase_clocks.py compiles persistent_mma.cu with RNN_GPU_PHASE_CLOCKS: its kernels
    then read the cycle counter and the global timer and keep their totals in the rg_phase_*
    arrays (extern "C", so the script finds them by name). The build the backend uses has
    neither: the instrumentation costs nothing there."""
    define = ["-DRNN_GPU_PHASE_CLOCKS"] if clocks else []
    text = persistent_mma_ptx(tmp_path, "sm_90", *define)
    if clocks:          # and nvcc's host pass, which -ptx skips, takes it too
        persistent_mma_ptx(tmp_path, "sm_90", *define, "-c")
    for needle in ("%globaltimer", "%clock64", ".global .align 8 .b8 rg_phase_sum[64]",
                   "rg_phase_min", "rg_phase_max", "rg_phase_loop"):
        assert (needle in text) == clocks, needle


def instantiating_unit(src: str) -> str:
    """C++ that includes ``src``.cu and instantiates every template the backend asks NVRTC
    for (taking a kernel template's address in host code instantiates it)."""
    names = [n for d in cb.DTYPES for n in csources.name_expressions(src, d)]
    body = "".join(f"    (void)&{name};\n" for name in names)
    return (f'#include "{(KERNELS / f"{src}.cu").as_posix()}"\n\n'
            f"void rnn_gpu_nvcc_check_{src}() {{\n{body}}}\n")


def test_instantiating_unit_names_every_kernel_of_the_source():
    for src in SOURCES:
        unit = instantiating_unit(src)
        kernels = set(re.findall(r"__global__\s+void(?:\s+__launch_bounds__\([^)]*\))?\s+(\w+)",
                                 (KERNELS / f"{src}.cu").read_text()))
        instantiated = set(re.findall(r"\(void\)&(\w+)<", unit))
        assert kernels and instantiated == kernels, (src, kernels ^ instantiated)


def test_kernel_source_inlines_the_shared_header():
    for src in SOURCES:
        text = csources.kernel_source(src)
        assert not re.search(r'^#include "', text, re.MULTILINE)
        assert "struct GatedStep" in text


# ---------------------------------------------------------------------- what Python mirrors

def test_call_tables_are_the_kernels_structs():
    """The fields of each call table, in order, as recurrent.cu declares them: a field out of
    place would send a kernel to the wrong array."""
    source = (KERNELS / "recurrent.cu").read_text()
    structs = dict(re.findall(r"struct (\w+Call) \{(.*?)\};", source, flags=re.S))
    assert set(structs) == set(cgraphs.CALL_TABLES)
    for name, body in structs.items():
        fields = tuple(re.findall(r"\*\s*(\w+);", body))
        assert fields == cgraphs.CALL_TABLES[name], name


def test_mma_shared_memory_padding_agrees_with_the_kernel():
    source = (KERNELS / "persistent_mma.cu").read_text()
    pad = re.search(r"constexpr long long MMA_SMEM_PAD = (\d+);", source)
    assert pad and int(pad.group(1)) == cdev.MMA_SMEM_PAD
    # 16-byte row copies: a padded row of 16-bit elements stays 16-byte aligned
    assert (cdev.MMA_SMEM_PAD * 2) % 16 == 0


def _ci_script(name: str) -> Path:
    """A script of the checkout's .ci/ (beside tests/, not beside the kernels: tests run
    against an installed wheel too); skipped where there is none (an sdist holds no .ci)."""
    path = Path(__file__).resolve().parents[1] / ".ci" / name
    if not path.is_file():
        pytest.skip(f"no .ci/{name} beside tests/")
    return path


@pytest.mark.parametrize("script, needs", [("phase_clocks.py", None),
                                           ("profile_cupy_step.py", "torch")])
def test_the_cards_scripts_start(script, needs):
    """.ci/gpu runs these on a lent card only; here they must at least import and parse their
    arguments (a typo would cost a card run)."""
    if needs:
        pytest.importorskip(needs)
    path = _ci_script(script)
    done = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stdout + done.stderr


def test_phase_clocks_variants_split_settings_from_defines():
    """``--variant="rows=2 tiles=warp chunk=1024 -DBWD_STAGGER=1"``: two row groups, warp
    tiles, 1 KiB chunks and one -D option."""
    spec = importlib.util.spec_from_file_location(
        "phase_clocks", _ci_script("phase_clocks.py"))
    clocks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(clocks)
    plain = {"MMA_ROW_GROUPS": 1, "MMA_WARP_TILES": False, "MMA_BWD_CHUNK_BYTES": 512}
    assert clocks.split_variant("") == (plain, [])
    assert clocks.split_variant("-DMMA_CHAINS=2") == (plain, ["-DMMA_CHAINS=2"])
    assert clocks.split_variant("rows=2 tiles=warp chunk=1024 -DBWD_STAGGER=1") == (
        {"MMA_ROW_GROUPS": 2, "MMA_WARP_TILES": True, "MMA_BWD_CHUNK_BYTES": 1024},
        ["-DBWD_STAGGER=1"])
    assert all(hasattr(cb, key) for key in plain)
    for bad in ("rows=0", "rows=two", "rows="):
        with pytest.raises(SystemExit, match="rows=N needs a positive integer N"):
            clocks.split_variant(bad)
    with pytest.raises(SystemExit, match="chunk=N needs a positive integer N, a multiple of 512"):
        clocks.split_variant("chunk=768")
    with pytest.raises(SystemExit, match="tiles= takes only 'warp'"):
        clocks.split_variant("tiles=32")
