"""The README's code blocks work as written: its two first commands are Makefile targets, every
`llmquant` command parses, its recipe builds, its links exist, and (slow, on the real model) its Python
block runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from llmquant import Recipe
from llmquant.cli import build_parser
from llmquant.nn.quant_linear import QuantLinear

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def commands(prefix: str) -> list[list[str]]:
    """Every command line of the bash blocks that starts with ``prefix`` (comments dropped)."""
    found = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == prefix:
                found.append(words)
    return found


def test_the_readme_starts_with_the_two_commands_and_the_makefile_has_them() -> None:
    first = code_blocks("bash")[0]
    assert [w[:2] for w in commands("make")][:2] == [["make", "run"], ["make", "test"]]
    assert README.index(first) < README.index("\n## ")
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^run:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    recipe = re.search(r"^RECIPE\s*\?=\s*(\S+)", makefile, re.M)
    assert recipe is not None and (ROOT / recipe.group(1)).is_file()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def llmquant_arguments(words: list[str]) -> list[str] | None:
    """The arguments `llmquant` gets from a command line of the README: ``llmquant ...``, ``.venv/bin/llmquant
    ...``, ``python -m llmquant ...`` or ``torchrun [options] -m llmquant ...``; None for any other command
    (``make ...``)."""
    if words and Path(words[0]).name == "llmquant":
        return words[1:]
    if words and (Path(words[0]).name.startswith("python") or words[0] == "torchrun"):
        for i in range(1, len(words) - 1):
            if words[i] == "-m" and words[i + 1] == "llmquant":
                return words[i + 2:]
    return None


def llmquant_commands() -> list[list[str]]:
    """Every llmquant command line of the README's bash blocks, as the arguments its parser gets."""
    found = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            arguments = llmquant_arguments(shlex.split(line, comments=True))
            if arguments is not None:
                found.append(arguments)
    return found


def test_every_llmquant_command_in_the_readme_parses() -> None:
    found = llmquant_commands()
    assert len(found) >= len(commands("llmquant")) >= 6
    for arguments in found:
        try:
            args = build_parser().parse_args(arguments)
        except SystemExit:
            pytest.fail(f"the README's `llmquant {shlex.join(arguments)}` does not parse")
        config = getattr(args, "config", None)
        if config:
            assert (ROOT / config).is_file(), config


def test_the_readme_command_finder_knows_every_form() -> None:
    assert llmquant_arguments(["llmquant", "detect"]) == ["detect"]
    assert llmquant_arguments([".venv/bin/llmquant", "eval"]) == ["eval"]
    assert llmquant_arguments(["python", "-m", "llmquant", "sweep", "--output", "o"]) == ["sweep", "--output", "o"]
    torchrun = ["torchrun", "--nproc-per-node", "2", "-m", "llmquant", "quantize", "--output", "o"]
    assert llmquant_arguments(torchrun) == ["quantize", "--output", "o"]
    assert llmquant_arguments(["make", "run"]) is None and llmquant_arguments(["python", "x.py"]) is None


def test_the_readme_recipe_builds() -> None:
    [block] = code_blocks("yaml")
    recipe = Recipe.build(**yaml.safe_load(block))
    assert recipe.algorithm == "gptq" and [p.name for p in recipe.pre_opts] == ["quarot", "smoothquant"]


def test_every_shipped_recipe_builds_and_the_readme_names_only_existing_ones() -> None:
    shipped = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
    for path in shipped:
        Recipe.from_file(path)
    named = set(re.findall(r"configs/recipes/[\w.+-]+\.yaml", README))
    assert named and named <= {str(path.relative_to(ROOT)) for path in shipped}


def test_the_readme_links_exist() -> None:
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target


@pytest.mark.slow
def test_the_readme_python_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    [block] = code_blocks("python")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "out" / "readme-w8a8" / "config.json").is_file()
    assert any(isinstance(m, QuantLinear) for m in namespace["model"].modules())
