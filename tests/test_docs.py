"""The docs say what works: every `python launch.py ...` in README.md and docs/ composes and
validates, as `--cfg job` checks it (launching.jobs.check_launch; with -m, every job of the sweep),
every `make <target>` is a target of the Makefile, every `python -m <module>` is importable, every
relative link leads to a file (and heading) of the repository, and every table of config groups
lists the options conf/ holds.

Commands are read from code: fenced and indented blocks and inline `code`; a block line may
continue with `\\`, start with `$ ` or `VAR=value` assignments, and end in a `# comment`. A block
line right after a command that starts with `error: ` is the output the command must give.
Commands with a placeholder (`<run dir>`, `...`) cannot be run as written and are left out. A doc
that tells the reader to save a config file ("Save as `conf/dataset/stl10.yaml`:" and a YAML block)
has its commands checked with those files added, as --config-dir adds them (docs/extending.md).
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from launching import cli
from launching.jobs import check_launch
from tests.helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
PLACEHOLDER = re.compile(r"\.\.\.|<[^>]*>")
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
FENCE = re.compile(r"^ {0,3}(```+|~~~+)")
PYTHONS = ("python", "python3", "$(PY)")
# Relative paths in inline code that name files of the repository (others name outputs).
SOURCE_PATH = re.compile(r"(?:conf|soda|hydra_plugins)/[\w./-]*")
# "Save as `conf/dataset/stl10.yaml`:" (or `sweeps/<name>.yaml`), then the file in a YAML block.
SAVE_AS = re.compile(
    r"[Ss]ave (?:it )?as `(?P<path>(?:conf|sweeps)/[\w./-]+\.yaml)`:?[^\n]*\n\s*```ya?ml\n(?P<text>.*?)^```",
    flags=re.S | re.M,
)


@dataclass(frozen=True)
class Snippet:
    """Code in a doc: a block's lines, or one inline span."""

    doc: Path
    line: int  # of its first line, from 1
    lines: tuple[str, ...]
    block: bool


@dataclass(frozen=True)
class Command:
    doc: Path
    line: int
    text: str  # as written, continuation lines joined, without the prompt and the comment
    env: tuple[tuple[str, str], ...]
    words: tuple[str, ...]  # the program and its arguments
    error: str | None = None  # the `error: ...` line the doc shows under it

    def __str__(self) -> str:
        return f"{_name(self.doc)}:{self.line}: {self.text}"


def snippets(doc: Path, text: str | None = None) -> list[Snippet]:
    """The code of a Markdown file: fenced blocks, indented blocks and inline spans."""
    lines = (doc.read_text() if text is None else text).splitlines()
    found: list[Snippet] = []
    prose: list[tuple[int, str]] = []  # (line number, text) of the lines outside blocks
    number = 0
    while number < len(lines):
        line = lines[number]
        fence = FENCE.match(line)
        if fence:
            close = fence[1]
            end = next((n for n in range(number + 1, len(lines)) if lines[n].strip().startswith(close)), len(lines))
            found.append(Snippet(doc, number + 2, tuple(lines[number + 1 : end]), True))
            number = end + 1
            continue
        after_blank = number == 0 or not lines[number - 1].strip()
        if after_blank and line.startswith(("    ", "\t")) and line.strip():
            end = number
            while end < len(lines) and (lines[end].startswith(("    ", "\t")) or not lines[end].strip()):
                end += 1
            block = [code[4:] if code.startswith("    ") else code[1:] for code in lines[number:end]]
            found.append(Snippet(doc, number + 1, tuple(block), True))
            number = end
            continue
        prose.append((number + 1, line))
        number += 1
    # An inline span may wrap onto the next line, never past the end of its paragraph.
    paragraph: list[tuple[int, str]] = []
    for number, line in [*prose, (0, "")]:
        if line.strip() and (not paragraph or paragraph[-1][0] == number - 1):
            paragraph.append((number, line))
            continue
        starts, joined = [], ""
        for _, part in paragraph:
            starts.append(len(joined))
            joined += part + " "
        for span in re.finditer(r"(`+)(.+?)\1", joined):
            which = max(n for n, start in enumerate(starts) if start <= span.start())
            found.append(Snippet(doc, paragraph[which][0], (span[2].strip(),), False))
        paragraph = [(number, line)] if line.strip() else []
    return sorted(found, key=lambda snippet: snippet.line)


def _name(doc: Path) -> str:
    return str(doc.relative_to(REPO)) if doc.is_relative_to(REPO) else doc.name


def commands(snippet: Snippet) -> list[Command]:
    """The shell commands of a snippet: each line (with its continuations) that parses as one."""
    found: list[Command] = []
    lines = list(snippet.lines)
    number = 0
    while number < len(lines):
        start = number
        text = lines[number].rstrip()
        while text.endswith("\\") and number + 1 < len(lines):
            number += 1
            text = text[:-1].rstrip() + " " + lines[number].strip()
        number += 1
        text = text.strip()
        if text.startswith("$ "):
            text = text[2:]
        try:
            words = shlex.split(text, comments=True)
        except ValueError:  # unbalanced quotes: prose, not a command
            continue
        env = []
        while words and ENV_ASSIGNMENT.match(words[0]):
            name, value = words.pop(0).split("=", 1)
            env.append((name, value))
        if words and words[0] == "sudo":
            words.pop(0)
        if not words:
            continue
        following = lines[number].strip() if snippet.block and number < len(lines) else ""
        error = following[len("error: ") :] if following.startswith("error: ") else None
        written = _without_comment(text)
        found.append(Command(snippet.doc, snippet.line + start, written, tuple(env), tuple(words), error))
    return found


def _without_comment(text: str) -> str:
    """A shell line without its trailing `# comment` (a # that starts a word, outside quotes)."""
    quote = None
    for position, character in enumerate(text):
        if quote:
            quote = None if character == quote else quote
        elif character in "'\"":
            quote = character
        elif character == "#" and (position == 0 or text[position - 1].isspace()):
            return text[:position].rstrip()
    return text


def launch_arguments(command: Command) -> list[str] | None:
    """The arguments launch.py gets from a command (`python launch.py ...`, `torchrun ... launch.py
    ...`), or None when the command does not run launch.py."""
    words = command.words
    program = Path(words[0]).name
    if program in PYTHONS and len(words) > 1 and Path(words[1]).name == "launch.py":
        return list(words[2:])
    if program == "torchrun":
        script = next((n for n, word in enumerate(words) if Path(word).name == "launch.py"), None)
        return None if script is None else list(words[script + 1 :])
    return None


def all_commands(docs: list[Path] = DOCS) -> list[Command]:
    return [command for doc in docs for snippet in snippets(doc) for command in commands(snippet)]


def example_files(doc: Path) -> dict[str, str]:
    """The config files a doc tells the reader to save, by their path in the repository (none for
    text that is not a file of the repository, such as launch.py's --help)."""
    if not doc.is_file():
        return {}
    return {match["path"]: match["text"] for match in SAVE_AS.finditer(doc.read_text())}


@functools.cache
def example_config_dir(doc: Path) -> str | None:
    """A folder holding the doc's example files as --config-dir takes them (conf/dataset/x.yaml
    as dataset/x.yaml, sweeps/x.yaml as sweep/x.yaml), or None when the doc has none."""
    files = example_files(doc)
    if not files:
        return None
    folder = Path(tempfile.mkdtemp(prefix="soda-doc-examples-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    for path, text in files.items():
        relative = Path(path).relative_to("conf") if path.startswith("conf/") else Path("sweep", Path(path).name)
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(text)
    return str(folder)


def launch_commands(docs: list[Path] = DOCS) -> list[Command]:
    """Each distinct launch.py command of the docs that can run as written."""
    found: dict[str, Command] = {}
    for command in all_commands(docs):
        arguments = launch_arguments(command)
        if arguments is not None and not PLACEHOLDER.search(" ".join(arguments)):
            found.setdefault(str(command), command)
    return list(found.values())


@functools.cache
def _checked(arguments: tuple[str, ...], env: tuple[tuple[str, str], ...]) -> str | None:
    """check_launch's verdict as launch.py prints it (None: the command is valid)."""
    saved = {name: os.environ.get(name) for name, _ in env}
    os.environ.update(dict(env))
    try:
        check_launch(arguments)
    except Exception as error:  # what launch.py reports as `error: <one line>`
        return cli.one_line(error)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return None


def check_command(command: Command) -> None:
    """Fails unless launch.py would accept the command, or refuse it with the error the doc shows."""
    examples = example_config_dir(command.doc)
    arguments = tuple(launch_arguments(command) or ())
    problem = _checked(("--config-dir", examples, *arguments) if examples else arguments, command.env)
    if command.error is None:
        assert problem is None, f"{command}\n  error: {problem}"
    else:
        assert problem == command.error, f"{command}\n  the doc shows: error: {command.error}\n  it gives: {problem}"


@pytest.mark.parametrize("command", launch_commands(), ids=str)
def test_documented_launch_command_composes_and_validates(command: Command):
    check_command(command)


def test_the_docs_hold_launch_commands_single_runs_and_sweeps():
    # The collector finds what the docs hold: without this, a broken collector would pass everything.
    found = launch_commands()
    assert len(found) >= 10
    assert any("-m" in command.words for command in found)
    assert any(command.doc.name == "README.md" for command in found)
    assert any(command.doc.parent.name == "docs" for command in found)


def test_a_command_that_does_not_validate_fails_the_check(tmp_path: Path):
    doc = tmp_path / "bad.md"
    doc.write_text(
        "Run\n\n    python launch.py experiment=demo schedule.epochs=-1\n\nand a sweep\n\n"
        "```\npython launch.py -m experiment=demo schedule.epochs=2,0   # the second job is wrong\n```\n"
    )
    single, sweep = launch_commands([doc])
    with pytest.raises(AssertionError, match=r"error: schedule\.epochs=-1 must be at least 1"):
        check_command(single)
    with pytest.raises(AssertionError, match=r"schedule\.epochs=0 must be at least 1 \(in job 1 of 2"):
        check_command(sweep)


def test_an_error_the_doc_shows_must_be_the_one_given(tmp_path: Path):
    doc = tmp_path / "errors.md"
    doc.write_text(
        "```\n$ python launch.py schedule.epochs=-1\nerror: schedule.epochs=-1 must be at least 1\n"
        "$ python launch.py schedule.epochs=2\nerror: schedule.epochs=2 must be at least 1\n```\n"
    )
    shown, wrong = launch_commands([doc])
    assert shown.error == "schedule.epochs=-1 must be at least 1"
    check_command(shown)
    with pytest.raises(AssertionError, match="the doc shows"):
        check_command(wrong)


def test_commands_are_read_from_every_kind_of_code(tmp_path: Path):
    doc = tmp_path / "kinds.md"
    doc.write_text(
        "Intro with `python launch.py model=tiny` inline and `python launch.py\ndataset=shapes` wrapped.\n\n"
        "    $ SODA_DATA=/data python launch.py dataset=cifar10 \\\n"
        "        schedule.epochs=3   # two lines\n\n"
        "~~~bash\nsudo make slurm-up\ntorchrun --nproc_per_node=2 launch.py experiment=demo\n"
        "python launch.py -m sweep=x experiment=...\npython launch.py <run dir>\n~~~\n"
    )
    found = all_commands([doc])
    assert [command.text for command in found] == [
        "python launch.py model=tiny",
        "python launch.py dataset=shapes",
        "SODA_DATA=/data python launch.py dataset=cifar10 schedule.epochs=3",
        "sudo make slurm-up",
        "torchrun --nproc_per_node=2 launch.py experiment=demo",
        "python launch.py -m sweep=x experiment=...",
        "python launch.py <run dir>",
    ]
    assert [command.line for command in found] == [1, 1, 4, 8, 9, 10, 11]
    assert found[2].env == (("SODA_DATA", "/data"),)
    assert [launch_arguments(command) for command in launch_commands([doc])] == [
        ["model=tiny"],
        ["dataset=shapes"],
        ["dataset=cifar10", "schedule.epochs=3"],
        ["experiment=demo"],
    ]


def test_an_environment_assignment_reaches_the_composition(tmp_path: Path, monkeypatch):
    # The root resolves from the variable only while the command's assignment is in effect.
    monkeypatch.delenv("SODA_DOCS_ROOT", raising=False)
    doc = tmp_path / "env.md"
    doc.write_text(
        "    SODA_DOCS_ROOT=/elsewhere python launch.py 'dataset.root=${oc.env:SODA_DOCS_ROOT}/x'\n"
        "    python launch.py 'dataset.root=${oc.env:SODA_DOCS_ROOT}/x'\n"
    )
    with_variable, without = launch_commands([doc])
    check_command(with_variable)
    with pytest.raises(AssertionError, match="SODA_DOCS_ROOT"):
        check_command(without)
    assert "SODA_DOCS_ROOT" not in os.environ


# make targets and python -m modules.


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", (REPO / "Makefile").read_text(), flags=re.M))


def make_target(command: Command) -> str | None:
    words = command.words
    if Path(words[0]).name != "make":
        return None
    # Bare `make` (as prose names the tool) names no target.
    return next((word for word in words[1:] if not word.startswith("-") and "=" not in word), None)


def python_module(command: Command) -> str | None:
    words = command.words
    if Path(words[0]).name in PYTHONS and len(words) > 2 and words[1] == "-m":
        return words[2]
    return None


def test_every_documented_make_target_exists():
    targets = make_targets()
    named = {(make_target(c), str(c)) for c in all_commands() if make_target(c) is not None}
    assert {"demo", "test"} <= {target for target, _ in named}  # the collector sees them
    missing = [where for target, where in sorted(named) if target not in targets]
    assert not missing, f"make targets not in the Makefile: {missing}"


def test_every_documented_python_module_exists():
    named = {(python_module(c), str(c)) for c in all_commands() if python_module(c) is not None}
    assert named, "the docs name no `python -m` module: is the collector broken?"
    missing = [where for module, where in sorted(named) if importlib.util.find_spec(module) is None]
    assert not missing, f"python -m modules that do not exist: {missing}"


# Links and paths.


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    in_fence = False
    for line in doc.read_text().splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading and not in_fence:
            base = slug(heading[1])
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(doc: Path) -> list[tuple[str, int]]:
    """(target, line) of each Markdown link and image of a doc, code left out."""
    code = {snippet.line + n for snippet in snippets(doc) if snippet.block for n in range(len(snippet.lines))}
    found = []
    for number, line in enumerate(doc.read_text().splitlines(), start=1):
        if number in code or FENCE.match(line):
            continue
        prose = re.sub(r"`[^`]*`", "", line)
        targets = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)
        targets += re.findall(r"^\s*\[[^\]]+\]:\s*(\S+)", prose)
        found += [(target, number) for target in targets]
    return found


def broken_links(docs: list[Path]) -> tuple[int, list[str]]:
    """(how many relative links were checked, those whose file or heading does not exist)."""
    checked, broken = 0, []
    for doc in docs:
        for target, number in links(doc):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, fragment = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            checked += 1
            if not file.exists():
                broken.append(f"{_name(doc)}:{number}: {target} (no such file)")
            elif fragment and file.suffix == ".md" and fragment not in anchors(file):
                broken.append(f"{_name(doc)}:{number}: {target} (no heading #{fragment} in {_name(file)})")
    return checked, broken


def test_every_relative_link_leads_to_a_file_and_heading_of_the_repository():
    checked, broken = broken_links(DOCS)
    assert checked >= 5, "the docs hold almost no links: is the collector broken?"
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_a_broken_link_or_anchor_is_found(tmp_path: Path):
    (tmp_path / "other.md").write_text("# Other\n\n## Tables and plots: `make table`\n")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# Top\n\nSee [a](other.md#tables-and-plots-make-table), [b](nowhere.md), [c](#top), [d](#gone),\n"
        "[e](other.md#nope), ![f](other.md) and [g](https://example.com/x).\n\n"
        "    [not a link](code.md)\n\n[ref]: other.md\n"
    )
    assert anchors(tmp_path / "other.md") == {"other", "tables-and-plots-make-table"}
    assert [target for target, _ in links(doc)] == [
        "other.md#tables-and-plots-make-table",
        "nowhere.md",
        "#top",
        "#gone",
        "other.md#nope",
        "other.md",
        "https://example.com/x",
        "other.md",
    ]
    checked, broken = broken_links([doc])
    assert checked == 7
    assert broken == [
        "doc.md:3: nowhere.md (no such file)",
        "doc.md:3: #gone (no heading #gone in doc.md)",
        "doc.md:4: other.md#nope (no heading #nope in other.md)",
    ]


# Paths the docs name that a command writes on the user's machine and git ignores.
WRITTEN_BY_COMMANDS = {"conf/site/default.yaml"}  # make site


def test_source_paths_named_in_inline_code_exist():
    assert all(_ignored_by_git(path) for path in WRITTEN_BY_COMMANDS)
    missing = []
    for doc in DOCS:
        saved = example_files(doc)  # files the doc tells the reader to write
        for snippet in snippets(doc):
            text = snippet.lines[0]
            if snippet.block or not SOURCE_PATH.fullmatch(text) or re.search(r"[<>*{}]|\.\.\.", text):
                continue
            if not (REPO / text).exists() and text not in WRITTEN_BY_COMMANDS and text not in saved:
                missing.append(f"{_name(doc)}:{snippet.line}: {text}")
    assert not missing, "paths that do not exist:\n" + "\n".join(missing)


# Tables of config groups.


def group_tables(docs: list[Path]) -> list[tuple[str, str, list[str]]]:
    """(where, group, options named) of each table row whose first cell is a group of conf/
    (`model/`) and whose second cell names its options in code."""
    rows = []
    for doc in docs:
        for number, line in enumerate(doc.read_text().splitlines(), start=1):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            group = re.fullmatch(r"`([\w/]+)/`", cells[0]) if len(cells) > 1 else None
            if group and (REPO / "conf" / group[1]).is_dir():
                rows.append((f"{_name(doc)}:{number}", group[1], re.findall(r"`([\w.-]+)`", cells[1])))
    return rows


def stale_group_tables(docs: list[Path]) -> list[str]:
    """The group table rows whose options are not exactly those of conf/<group>/."""
    stale = []
    for where, group, named in group_tables(docs):
        options = sorted(path.stem for path in (REPO / "conf" / group).glob("*.yaml"))
        if sorted(named) != options:
            stale.append(f"{where}: {group}/ lists {sorted(named)}, conf/{group}/ holds {options}")
    return stale


def test_tables_of_config_groups_name_exactly_the_options_in_conf():
    assert group_tables(DOCS), "no table of config groups found: is the collector broken?"
    stale = stale_group_tables(DOCS)
    assert not stale, "\n".join(stale)


def test_a_stale_group_table_is_found(tmp_path: Path):
    doc = tmp_path / "table.md"
    doc.write_text("| group | options |\n|---|---|\n| `model/` | `tiny` (small), `soda_r18_ddpm` |\n| `soda/` | x |\n")
    assert group_tables([doc]) == [("table.md:3", "model", ["tiny", "soda_r18_ddpm"])]
    assert stale_group_tables([doc]) == [
        "table.md:3: model/ lists ['soda_r18_ddpm', 'tiny'], conf/model/ holds ['soda_r18_ddpm', 'soda_r50_ddpm', 'tiny']"
    ]


def _ignored_by_git(path: str) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0
