"""The bank-conflict count of tests/fma_banks.py on layouts small enough to check by hand
(the compile check applies it to the kernels' real layouts: tests/test_triton_compile.py)."""

from __future__ import annotations

import pytest
from fma_banks import dot_operand_reads, operand_reads, parse_layouts

# The float32 LSTM forward's dot layout at 64 rows x 64 units, 8 warps (triton 3.6, sm_90)
DOT = {"sizePerThread": [4, 4], "threadsPerWarp": [2, 16], "warpsPerCTA": [8, 1],
       "order": [1, 0]}
ALONG_K = {"order": [0, 1]}          # a (k, unit) tile stored contiguous along k
ALONG_UNITS = {"order": [1, 0]}


def test_weights_contiguous_along_k_conflict_8_ways_per_phase():
    """Lane l owns units 4l..4l+3 (l < 16; lanes 16-31 the same units). A 16-byte read of
    k..k+3 at unit 4l sits at word 128 l + k: the 8 lanes of a phase hit the same 4 banks at 8
    different words, 8 wavefronts where 1 would do, for each of the 4 phases."""
    reads = operand_reads((32, 64), 1, DOT, ALONG_K)
    assert reads.loads == 32                      # 4 units x 8 groups of 4 k
    assert reads.wavefronts == 32 * 4 * 8 and reads.ideal == 32 * 4
    assert reads.conflict == 8


def test_weights_contiguous_along_units_are_conflict_free():
    """The same tile stored along the units: a phase reads 8 consecutive 16-byte words."""
    reads = operand_reads((32, 64), 1, DOT, ALONG_UNITS)
    assert reads.loads == 32                      # 32 k x one 16-byte read of 4 units
    assert reads.wavefronts == reads.ideal == 32 * 4


def test_rows_that_share_a_word_are_a_broadcast():
    """A (h, 64 x 32 contiguous along k): lanes 0-15 read the same row, 16-31 the row 4
    further on; each phase of 8 lanes reads one 16-byte word: 1 wavefront."""
    reads = operand_reads((64, 32), 0, DOT, ALONG_UNITS)
    assert reads.conflict == 1 and reads.wavefronts == reads.loads * 4


def test_four_byte_reads_of_a_column_conflict_32_ways():
    """One element per lane, 32 lanes down one column of a 32 x 32 tile stored row-major: 32
    words in one bank, served one by one."""
    column = {"sizePerThread": [1, 1], "threadsPerWarp": [32, 1], "warpsPerCTA": [1, 1],
              "order": [1, 0]}
    reads = operand_reads((32, 1), 0, column, {"order": [0, 1]})
    assert reads.loads == 1 and reads.wavefronts == 1          # contiguous: one 128-byte row
    strided = operand_reads((32, 32), 0, column, {"order": [1, 0]})
    # each lane reads its row's 32 elements as 8 16-byte reads; the 8 lanes of a phase are
    # 32 words apart, all in the same 4 banks
    assert strided.loads == 8 and strided.conflict == 8


def test_parses_the_layouts_and_loads_of_a_ttgir():
    ttgir = "\n".join([
        "#blocked3 = #ttg.blocked<{sizePerThread = [4, 4], threadsPerWarp = [2, 16], "
        "warpsPerCTA = [8, 1], order = [1, 0]}>",
        "#shared1 = #ttg.swizzled_shared<{vec = 1, perPhase = 1, maxPhase = 1, "
        "order = [0, 1]}>",
        "    %w = ttg.local_load %a token %t : !ttg.memdesc<32x64xf32, #shared1, #smem, "
        "mutable> -> tensor<32x64xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked3}>> loc(#l)",
    ])
    layouts = parse_layouts(ttgir)
    assert layouts["blocked3"]["sizePerThread"] == [4, 4]
    assert layouts["shared1"]["order"] == [0, 1]
    (reads,) = dot_operand_reads(ttgir)
    assert reads.operand == 1 and reads.shape == (32, 64) and reads.conflict == 8


def test_refuses_a_layout_it_does_not_model():
    """Three units a lane: lane 0 reads 8 then 4 bytes, lane 1 4 then 8; the hardware would
    split such a warp's reads in ways this count does not follow."""
    uneven = {"sizePerThread": [1, 3], "threadsPerWarp": [1, 32], "warpsPerCTA": [1, 1],
              "order": [1, 0]}
    with pytest.raises(ValueError, match="different loads"):
        operand_reads((4, 40), 1, uneven, ALONG_UNITS)
