"""How a neuron's values lie in ffn.bin: as floats, or quantized with their scales inside the bundle.

The paper keeps fp16 bundles and calls quantization orthogonal (its App. F); fewer bytes per bundle are
still fewer bytes to read. A store's rows are in one of four formats (`flashnb convert --dtype`):

    fp16, fp32  each of a neuron's P slices (up row, down column, ...) is d_model floats.
    int8        each slice in groups of GROUP = 32 values: 32 signed bytes and one fp16 scale per group
                (as llama.cpp's Q8_0: 34 bytes per 32 values, 8.5 bits a value).
    q4          each slice in groups of 32: 16 bytes holding 32 four-bit codes (value 2k in the low
                nibble of byte k, 2k + 1 in the high one, each stored + 8) and one fp16 scale (as Q4_0,
                which PowerInfer stores its sparse rows in: 18 bytes per 32 values, 4.5 bits a value).

A quantized slice is its codes, then its scales: [codes (d or d / 2 bytes) | scales (d / 16 bytes)], and
a bundle is its slices one after another, so a neuron is still one contiguous read and an unbundled
region holds one slice per row. The scale of a group is its largest magnitude over 127 (int8) or 7 (q4),
and a value is its rounded quotient: symmetric, no zero point, the error at most half a step.

The rows are not padded to the disk's block: at the shipped shape a block per neuron would waste 41% (int8)
to 78% (q4), and at OPT 6.7B's shape the rows are whole 512-byte blocks already (8,704 and 4,608 bytes).
The reader widens each request to the direct-I/O block as for float rows, and counts what it reads.

`RowFormat.encode` turns float slices into stored bytes (convert); `RowFormat.part` turns stored rows back
into one part's values (the engine's sparse FFN, the baselines, `FlashStore.load_model`), for the rows it
computes and no others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flashnb.errors import FlashnbError

GROUP = 32  # values per scale of a quantized slice
FLOAT_FORMATS = {"fp16": (torch.float16, np.dtype("<f2")), "fp32": (torch.float32, np.dtype("<f4"))}
QUANTIZED = {"int8": 8, "q4": 4}  # format -> bits per value
FFN_DTYPES = tuple(FLOAT_FORMATS) + tuple(QUANTIZED)


@dataclass(frozen=True)
class RowFormat:
    """The format (`name`, one of FFN_DTYPES) of each d-value slice of a neuron's bundle."""

    name: str
    d: int

    def __post_init__(self) -> None:
        if self.name not in FFN_DTYPES:
            raise FlashnbError(f"unknown FFN dtype {self.name!r}; choose one of {', '.join(FFN_DTYPES)}")
        if self.quantized and self.d % GROUP:
            raise FlashnbError(f"{self.name} rows quantize groups of {GROUP} values, and this model's d_model "
                               f"{self.d} is not a multiple of {GROUP}: convert it with --dtype fp16")

    @property
    def quantized(self) -> bool:
        return self.name in QUANTIZED

    @property
    def dtype(self) -> np.dtype:
        """The element type of a stored row: the float itself, or bytes for a quantized one."""
        return FLOAT_FORMATS[self.name][1] if not self.quantized else np.dtype(np.uint8)

    @property
    def code_bytes(self) -> int:
        return self.d * QUANTIZED[self.name] // 8 if self.quantized else self.d * self.dtype.itemsize

    @property
    def part_bytes(self) -> int:
        """Bytes of one slice (codes and scales)."""
        return self.code_bytes + (2 * (self.d // GROUP) if self.quantized else 0)

    @property
    def part_width(self) -> int:
        """Elements (of `dtype`) of one slice."""
        return self.part_bytes // self.dtype.itemsize

    @property
    def bits_per_value(self) -> float:
        return 8 * self.part_bytes / self.d

    # -- writing -------------------------------------------------------------------------------
    def encode(self, m: torch.Tensor) -> np.ndarray:
        """Slices m [n, d] (any float dtype) as stored: [n, part_width] of `dtype`."""
        if not self.quantized:
            return m.to(FLOAT_FORMATS[self.name][0]).contiguous().numpy()
        n, d = m.shape
        g = m.float().reshape(n, d // GROUP, GROUP)
        top = 2 ** (QUANTIZED[self.name] - 1) - 1  # 127 or 7
        scale = (g.abs().amax(-1, keepdim=True) / top).to(torch.float16)
        s32 = scale.float()
        codes = torch.where(s32 > 0, torch.round(g / torch.where(s32 > 0, s32, 1.0)), 0.0).clamp(-top, top)
        codes = codes.to(torch.int8).reshape(n, d)
        if self.name == "q4":
            c = (codes + 8).to(torch.uint8).reshape(n, d // 2, 2)
            body = (c[..., 0] | (c[..., 1] << 4)).numpy()
        else:
            body = codes.numpy().view(np.uint8)
        return np.ascontiguousarray(np.concatenate([body, scale.reshape(n, -1).numpy().view(np.uint8)], axis=1))

    # -- reading -------------------------------------------------------------------------------
    def part(self, rows: torch.Tensor, j: int, index: torch.Tensor | None = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Part j's values [k, d] of the stored rows `rows` [n, P * part_width] (of rows `index` only, when
        given): a view at the rows' precision for a float format, `dtype` for a quantized one. A value is
        its code times its group's scale, rounded once to `dtype` (as the dense model rebuilt from the store
        holds it); written in place into one new tensor, the fewest passes over the rows (measured: 4x
        faster for q4 than building the nibbles with torch.stack)."""
        w = self.part_width
        t = rows[:, j * w:(j + 1) * w]
        if index is not None:
            t = t.index_select(0, index)
        if not self.quantized:
            return t
        k, d, cb = t.shape[0], self.d, self.code_bytes
        scale = t[:, cb:].contiguous().view(torch.float16).to(dtype).reshape(k, d // GROUP, 1)
        body = t[:, :cb]
        if self.name == "q4":
            out = torch.empty(k, d // 2, 2, dtype=dtype)
            out[..., 0] = body & 15
            out[..., 1] = body >> 4
            out.sub_(8)
        else:
            out = body.contiguous().view(torch.int8).to(dtype)
        return out.view(k, d // GROUP, GROUP).mul_(scale).view(k, d)
