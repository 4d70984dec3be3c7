"""What g++ makes of the AVX2 op's `pair_dots` (``int8_gemv_avx2.cpp``'s comment: the 2 x MR sums kept in registers):
the op's source compiled to assembly with the build's flags (`llmquant.nn.int8_gemv.AVX2_FLAGS`, C++20 as torch's
extensions build), then, for each instantiation, its VPMADDWD count, its vector operands on the stack (spilled sums)
and its vector register-to-register moves inside its loop (sums copied between registers).

    .venv/bin/python bench/speed_2026-12-07_epyc_avx2_after/pair_dots_asm.py
"""

from __future__ import annotations

import re
import subprocess
import sysconfig
import tempfile
from pathlib import Path

from torch.utils import cpp_extension

from llmquant.nn import int8_gemv

FUNCTION = re.compile(r"^(_Z\w*pair_dotsILi(\d)E(\w)E[\w.]*):$")  # (a: int8 panel codes, s: widened int16 ones)


def assembly() -> list[str]:
    includes = [f"-I{path}" for path in [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]]
    out = Path(tempfile.mkdtemp()) / "avx2.s"
    subprocess.run(["g++", "-DTORCH_EXTENSION_NAME=asm_check", "-DTORCH_API_INCLUDE_EXTENSION_H", "-fPIC",
                    "-std=c++20", *int8_gemv.AVX2_FLAGS, *includes, "-S", "-o", str(out),
                    str(int8_gemv.AVX2_SOURCE)], check=True, capture_output=True)
    return out.read_text().splitlines()


def loop_of(body: list[str]) -> list[str]:
    """The lines of the loop around the first VPMADDWD: from the label before it to the jump back to that label."""
    first = next(i for i, text in enumerate(body) if text.startswith("vpmaddwd"))
    start = max(i for i in range(first) if body[i].endswith(":"))
    label = body[start][:-1]
    end = next(i for i in range(first, len(body)) if re.fullmatch(rf"j\w+\s+{re.escape(label)}", body[i]))
    return body[start:end + 1]


def main() -> None:
    lines = assembly()
    for index, line in enumerate(lines):
        if (found := FUNCTION.match(line)) is None:
            continue
        body = []
        for text in lines[index + 1:]:
            if ".cfi_endproc" in text:
                break
            body.append(text.strip())
        loop = loop_of(body)
        madds = sum(text.startswith("vpmaddwd") for text in body)
        spills = sum("ymm" in text and re.search(r"\(%r[sb]p\)", text) is not None for text in body)
        copies = sum(re.fullmatch(r"vmovdq[au]\s+%ymm\d+, %ymm\d+", text) is not None for text in loop)
        weight = {"a": "int8 panel", "s": "int16 panel"}[found.group(3)]
        print(f"pair_dots<{found.group(2)}, {weight}>: {madds} VPMADDWD, {spills} vector operands on the stack, "
              f"{copies} vector register moves in the loop")


if __name__ == "__main__":
    main()
