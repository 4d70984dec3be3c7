"""Packing codes into int32 words: compressed-tensors' pack-quantized layout, bit for bit, and back."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from llmquant.errors import LlmquantError
from llmquant.quant.packing import pack_int32, packed_length, unpack_fields, unpack_int32

SHAPES = [(1, 1), (3, 5), (7, 32), (16, 100), (33, 3), (64, 576), (9, 1536)]


def random_codes(shape: tuple[int, ...], bits: int, seed: int = 0) -> torch.Tensor:
    half = 1 << (bits - 1)
    return torch.randint(-half, half, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dim", [0, 1])
def test_packing_equals_compressed_tensors_bit_for_bit(bits: int, shape: tuple[int, int], dim: int) -> None:
    codes = random_codes(shape, bits, seed=bits)
    ours = pack_int32(codes, bits, dim=dim)
    theirs = pack_to_int32(codes, bits, packed_dim=dim)
    assert ours.dtype == torch.int32 and ours.shape == theirs.shape
    assert ours.shape[dim] == packed_length(shape[dim], bits)
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_int32(ours, bits, shape[dim], dim=dim), codes)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_unpacking_equals_compressed_tensors(bits: int, shape: tuple[int, int]) -> None:
    # along dim 1 only: their 4-bit unpack along dim 0 fails when the packed dim has one word (view of a
    # transposed tensor), a bug on their side
    packed = pack_to_int32(random_codes(shape, bits, seed=10 + bits), bits)
    assert torch.equal(unpack_int32(packed, bits, shape[1]), unpack_from_int32(packed, bits, torch.Size(shape)))


def test_four_bit_codes_fill_a_word_from_its_low_nibble() -> None:
    codes = torch.arange(-8, 0, dtype=torch.int8).reshape(1, 8)  # stored unsigned: 0, 1, ..., 7
    assert int(pack_int32(codes, 4)) == 0x76543210
    top = torch.tensor([[7, -8, -8, -8, -8, -8, -8, 7]], dtype=torch.int8)  # 15 in the top nibble: bit 31 set
    assert int(pack_int32(top, 4)) == 0xF000000F - (1 << 32)


def test_three_bit_codes_straddle_words() -> None:
    codes = torch.full((1, 32), -4, dtype=torch.int8)  # stored as 0
    codes[0, 10] = 3  # stored as 7 = 0b111 in bits 30, 31 of word 0 and bit 0 of word 1
    packed = pack_int32(codes, 3)
    assert packed.shape == (1, 3)
    assert packed.tolist() == [[-(1 << 31) + (1 << 30), 1, 0]]
    assert torch.equal(unpack_int32(packed, 3, 32), codes)


def test_fields_are_the_codes_offset_to_unsigned() -> None:
    codes = random_codes((5, 40), 3)
    fields = unpack_fields(pack_int32(codes, 3), 3, 40)
    assert fields.dtype == torch.int32 and torch.equal(fields, codes.to(torch.int32) + 4)


def test_packing_works_along_any_dimension_of_any_rank() -> None:
    codes = random_codes((3, 10, 7), 4)
    packed = pack_int32(codes, 4, dim=1)
    assert packed.shape == (3, 2, 7)  # 10 codes of 4 bits: 40 bits, 2 words
    assert torch.equal(unpack_int32(packed, 4, 10, dim=1), codes)


def test_bad_inputs_are_one_line_errors() -> None:
    codes = random_codes((2, 8), 4)
    with pytest.raises(LlmquantError, match="packing into int32 supports 1 to 8 bits per code, got 9"):
        pack_int32(codes, 9)
    with pytest.raises(LlmquantError, match="1 to 8 bits per code, got 0"):
        unpack_int32(pack_int32(codes, 4), 0, 8)
    with pytest.raises(LlmquantError, match=r"codes outside \[-4, 3\] cannot be packed in 3 bits"):
        pack_int32(codes.clamp(-8, -5), 3)
    with pytest.raises(LlmquantError, match="integer codes"):
        pack_int32(codes.float(), 4)
    with pytest.raises(LlmquantError, match="unpacking reads int32 words"):
        unpack_int32(codes, 4, 8)
    with pytest.raises(LlmquantError, match="1 int32 words cannot hold exactly 16 codes of 4 bits"):
        unpack_int32(pack_int32(codes, 4), 4, 16)
