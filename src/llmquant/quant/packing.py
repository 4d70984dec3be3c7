"""Pack sub-byte integer codes into int32 words: compressed-tensors' "pack-quantized" layout.

Layout (dense, no padding bits inside a chunk): along the packed dimension, codes are taken in chunks
of 32; a chunk of ``b``-bit codes fills exactly ``b`` int32 words. Code ``i`` of a chunk (i = 0..31) is
stored unsigned, as u_i = q_i + 2^(b-1), in bits [i*b, i*b + b) of the chunk read as one little-endian
(b*32)-bit integer, that is

    word   w_i = floor(i*b / 32),   shift  s_i = (i*b) mod 32,
    word[w_i]     holds the low  min(b, 32 - s_i) bits of u_i from bit s_i up,
    word[w_i + 1] holds the rest (only when 32 is not a multiple of b, e.g. b = 3) from bit 0 up.

For b = 4 this is 8 codes per word, code i of the word in bits [4i, 4i + 4). A last, incomplete chunk is
padded with zero bits and only the ceil(n*b / 32) words that hold codes are kept. Words are int32 with
two's complement (bit 31 set means negative). Codes are signed, q in [-2^(b-1), 2^(b-1) - 1], the
convention of compressed-tensors' ``int`` type (llmquant's asymmetric codes in [0, 2^b - 1] are first
shifted by -2^(b-1), see `llmquant.nn.quant_linear.storage_offset`).

A weight ``[out, in]`` is packed along ``in`` (``weight_packed`` ``[out, ceil(in*b/32)]``); the zero
points ``[out, groups]`` of an asymmetric one along ``out`` (``dim=0``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmquant.errors import LlmquantError

WORD_BITS = 32
_LOW_WORD = 0xFFFFFFFF


def packed_length(size: int, bits: int) -> int:
    """Number of int32 words holding ``size`` codes of ``bits`` bits: ceil(size * bits / 32)."""
    return -(-size * bits // WORD_BITS)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise LlmquantError(f"packing into int32 supports 1 to 8 bits per code, got {bits}")


def _chunk_layout(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Word index w_i and bit shift s_i of the 32 codes of a chunk (see the module docstring)."""
    start = torch.arange(WORD_BITS, device=device, dtype=torch.int64) * bits
    return start // WORD_BITS, start % WORD_BITS


def pack_int32(codes: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack signed ``bits``-bit integer ``codes`` along ``dim`` into int32 words (layout above): n codes
    become ceil(n * bits / 32) words."""
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex():
        raise LlmquantError(f"pack_int32 packs integer codes, got dtype {codes.dtype}")
    offset = 1 << (bits - 1)
    values = codes.movedim(dim, -1).to(torch.int64) + offset
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise LlmquantError(f"codes outside [{-offset}, {offset - 1}] cannot be packed in {bits} bits")
    lead, size = values.shape[:-1], values.shape[-1]
    chunks = -(-size // WORD_BITS)
    values = F.pad(values, (0, chunks * WORD_BITS - size)).reshape(*lead, chunks, WORD_BITS)
    word, shift = _chunk_layout(bits, values.device)
    placed = values << shift  # < 2^40: the bits past 32 are the part that spills into the next word
    words = torch.zeros(*lead, chunks, bits + 1, dtype=torch.int64, device=values.device)
    words.index_add_(-1, word, placed & _LOW_WORD)  # disjoint bit fields: the sum is their bitwise or
    words.index_add_(-1, word + 1, placed >> WORD_BITS)
    words = words[..., :bits].reshape(*lead, chunks * bits)[..., : packed_length(size, bits)]
    signed = torch.where(words >= 1 << 31, words - (1 << WORD_BITS), words)  # two's complement int32
    return signed.to(torch.int32).movedim(-1, dim).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, size: int, dim: int = -1) -> torch.Tensor:
    """Signed int8 codes of ``packed`` (int32 words from `pack_int32`), ``size`` codes along ``dim``."""
    return (unpack_fields(packed, bits, size, dim) - (1 << (bits - 1))).to(torch.int8).contiguous()


def unpack_fields(packed: torch.Tensor, bits: int, size: int, dim: int = -1) -> torch.Tensor:
    """The unsigned fields u = q + 2^(b-1) of ``packed``, as int32 (the fast path of dequantization)."""
    _check_bits(bits)
    if packed.dtype != torch.int32:
        raise LlmquantError(f"unpacking reads int32 words, got dtype {packed.dtype}")
    words = packed.movedim(dim, -1)
    if words.shape[-1] != packed_length(size, bits):
        raise LlmquantError(
            f"{words.shape[-1]} int32 words cannot hold exactly {size} codes of {bits} bits "
            f"(expected {packed_length(size, bits)})"
        )
    fields = _aligned_fields(words, bits) if WORD_BITS % bits == 0 else _straddling_fields(words, bits)
    return fields[..., :size].movedim(-1, dim)


def _aligned_fields(words: torch.Tensor, bits: int) -> torch.Tensor:
    """b divides 32, no code straddles two words: shift each word once per code it holds."""
    shifts = torch.arange(0, WORD_BITS, bits, dtype=torch.int32, device=words.device)
    fields = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # the mask drops the sign extension
    return fields.reshape(*words.shape[:-1], -1)


def _straddling_fields(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Any b: per chunk of b words, the codes starting in word j are consecutive (one shift each); the
    codes straddling words j and j + 1 then take their high bits from word j + 1."""
    lead, chunks = words.shape[:-1], -(-words.shape[-1] // bits)
    words = F.pad(words, (0, chunks * bits - words.shape[-1])).reshape(-1, bits)  # one row per chunk
    word, shift = _chunk_layout(bits, words.device)
    shift = shift.to(torch.int32)
    fields = torch.empty(words.shape[0], WORD_BITS, dtype=torch.int32, device=words.device)
    for j in range(bits):
        starting = slice(-(-WORD_BITS * j // bits), -(-WORD_BITS * (j + 1) // bits))
        fields[:, starting] = words[:, j : j + 1] >> shift[starting]
    spill = (shift + bits > WORD_BITS).nonzero().flatten()
    low_bits = WORD_BITS - shift[spill]  # the >> above sign-extended past their low bits: keep only those
    low = fields[:, spill] & ((1 << low_bits) - 1)
    fields[:, spill] = low | (words[:, word[spill] + 1] << low_bits)
    fields &= (1 << bits) - 1
    return fields.reshape(*lead, chunks * WORD_BITS)


__all__ = ["WORD_BITS", "pack_int32", "packed_length", "unpack_fields", "unpack_int32"]
