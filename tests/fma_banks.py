"""Shared-memory bank conflicts of Triton's FMA dots, counted from the compiled layouts.

A ``tl.dot`` in IEEE float32 runs on the CUDA cores (no tensor cores): Triton stages each
operand tile in shared memory without a swizzle and every thread reads the elements its part
of the output needs, 16 bytes at a time along the tile's contiguous dimension. Whether those
reads collide in the 32 banks depends only on two layouts that the TTGIR names: the operand's
shared layout (which dimension is contiguous) and the dot's blocked layout (which rows or
columns each lane owns). This module replays those reads for one warp and counts wavefronts
(bank cycles) the way the hardware serves them: a 16-byte access in four phases of 8 lanes,
an 8-byte one in two of 16, a 4-byte one in one; within a phase, one wavefront per distinct
word in the busiest bank (lanes reading the same word share it). A 16-byte read so takes at
least four wavefronts, as it must: shared memory returns 128 bytes a cycle, a quarter of what
a warp's 16-byte read delivers. Two assumptions, both from NVIDIA's forum answers rather than
the manuals: conflicts arise only within a phase (lanes 0 and 16 reading the same word are
still served in two phases), and the uniform-pair case (lane n reading what lane n^1 or n^2
reads, which can take two wavefronts instead of four) is ignored, so the broadcast reads of
the A operand may be counted up to 2x high.

No GPU and no Triton import: ``tests/triton_compile_check.py --fma-banks`` feeds it the TTGIR
of the kernels as a launch compiles them (docs/performance.md: the float32 forward's step
time on the H100 follows these counts).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LANES, BANKS, WORD = 32, 32, 4
LANES_PER_PHASE = {16: 8, 8: 16, 4: 32}      # access bytes -> lanes served together


@dataclass(frozen=True)
class OperandReads:
    """One dot operand's reads from shared memory by one warp, for the whole tile."""

    operand: int                 # 0: A (M x K), 1: B (K x N)
    shape: tuple[int, int]
    contiguous_dim: int          # the shared layout's order[0]
    loads: int                   # load instructions per thread
    wavefronts: int              # bank cycles for the warp
    ideal: int                   # the same bytes without conflicts

    @property
    def conflict(self) -> float:
        return self.wavefronts / self.ideal


def parse_layouts(ttgir: str) -> dict[str, dict]:
    """``#name = #ttg.blocked<{...}>`` / ``#ttg.swizzled_shared<{...}>`` -> their fields."""
    layouts = {}
    for m in re.finditer(r"^#(\w+) = #ttg\.(blocked|swizzled_shared)<\{(.*?)\}>", ttgir, re.M):
        fields = {"kind": m.group(2)}
        for key, value in re.findall(r"(\w+) = (\[[^\]]*\]|\d+)", m.group(3)):
            fields[key] = ([int(v) for v in value.strip("[]").split(",") if v.strip()]
                           if value.startswith("[") else int(value))
        layouts[m.group(1)] = fields
    return layouts


def _split(index: int, sizes: list[int], order: list[int]) -> list[int]:
    """A lane (or warp) id as per-dimension ids, ``order[0]`` varying fastest."""
    out = [0, 0]
    for dim in order:
        out[dim] = index % sizes[dim]
        index //= sizes[dim]
    return out


def _owned(size: int, per_thread: int, lanes: int, warps: int, lane: int, warp: int) -> list[int]:
    """Coordinates along one dimension that a blocked layout gives one lane (wrapping, as a
    layout larger than the tensor does)."""
    tile = per_thread * lanes * warps
    return sorted({(rep * tile + (warp * lanes + lane) * per_thread + e) % size
                   for rep in range(max(1, size // tile)) for e in range(per_thread)})


def _vectors(elements: set[tuple[int, int]], fast: int, per_vector: int):
    """A thread's elements as aligned 16/8/4-byte accesses along the contiguous dimension."""
    left, out = set(elements), []
    for e in sorted(elements, key=lambda e: (e[1 - fast], e[fast])):
        if e not in left:
            continue
        for width in (per_vector, 2, 1):
            run = [tuple(c + (j if d == fast else 0) for d, c in enumerate(e))
                   for j in range(width)]
            if e[fast] % width == 0 and all(c in left for c in run):
                break
        left.difference_update(run)
        out.append((e, width))
    return out


def operand_reads(shape: tuple[int, int], operand: int, parent: dict, shared: dict,
                  warp: int = 0, elem_bytes: int = WORD) -> OperandReads:
    """Replay warp ``warp``'s reads of one FMA dot operand of ``shape`` (A: M x K, B: K x N)."""
    rows, cols = shape
    fast = shared["order"][0]
    address = (lambda r, c: r * cols + c) if fast == 1 else (lambda r, c: c * rows + r)
    per_vector = 16 // elem_bytes
    warp_ids = _split(warp, parent["warpsPerCTA"], parent["order"])
    per_lane = []
    for lane in range(LANES):
        lane_ids = _split(lane, parent["threadsPerWarp"], parent["order"])
        dim = 0 if operand == 0 else 1           # A: the lane's rows; B: the lane's columns
        owned = _owned(shape[dim], parent["sizePerThread"][dim], parent["threadsPerWarp"][dim],
                       parent["warpsPerCTA"][dim], lane_ids[dim], warp_ids[dim])
        if operand == 0:
            elements = {(r, k) for r in owned for k in range(cols)}
        else:
            elements = {(k, n) for k in range(rows) for n in owned}
        per_lane.append([(address(*e) * elem_bytes, width * elem_bytes)
                         for e, width in _vectors(elements, fast, per_vector)])
    loads = len(per_lane[0])
    widths = [nbytes for _, nbytes in per_lane[0]]
    if any([nbytes for _, nbytes in reads] != widths for reads in per_lane):
        raise ValueError("lanes issue different loads (count or width): not a layout this "
                         "models")
    wavefronts = ideal = 0
    for i in range(loads):
        size = per_lane[0][i][1]
        phase = LANES_PER_PHASE[size]
        for first in range(0, LANES, phase):
            words_in_bank: dict[int, set[int]] = {}
            for lane in range(first, first + phase):
                start, nbytes = per_lane[lane][i]
                for word in range(start // WORD, (start + nbytes) // WORD):
                    words_in_bank.setdefault(word % BANKS, set()).add(word)
            wavefronts += max(len(words) for words in words_in_bank.values())
            distinct = len(set().union(*words_in_bank.values()))
            ideal += -(-distinct // BANKS)
    return OperandReads(operand, shape, fast, loads, wavefronts, ideal)


_LOCAL_LOAD = re.compile(
    r"ttg\.local_load [^\n]*?memdesc<(\d+)x(\d+)xf32, #(\w+)[^\n]*?-> "
    r"tensor<\d+x\d+xf32, #ttg\.dot_op<\{opIdx = (\d), parent = #(blocked\w*)\}>>")


def dot_operand_reads(ttgir: str) -> list[OperandReads]:
    """Every float32 dot operand that a kernel's TTGIR reads from shared memory."""
    layouts = parse_layouts(ttgir)
    return [operand_reads((int(m[1]), int(m[2])), int(m[4]), layouts[m[5]], layouts[m[3]])
            for m in _LOCAL_LOAD.finditer(ttgir)]
