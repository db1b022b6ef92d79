"""README.md and docs/*.md: every command in a fenced block runs as printed, or at least parses, against the shipped
files, and every relative link (and #anchor) resolves.

Cheap commands run for real: every `octft ... --help` (and `--help` of every octft command the documents use), `uv run
octft --help`, the `octft synth` / `octft data audit` / `octft data inspect` sequences on local paths (in a temporary
folder), `make -n` of every make command, the checkpoint conversion snippet. The rest (train, sweeps, promote,
predict, ui, ...) are parsed by octft's own parser exactly as `octft.cli.main` parses them, and every shipped
experiment or sweep file they name is loaded with the command's overrides, without training anything; placeholders
(`<bucket>`, `...`) are allowed only there. Benchmark scripts must exist and take the options given; `mlflow`
commands must name a command and options of MLflow's CLI.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from octft.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
# Programs a document may run besides octft, make and the venv's python: anything else is a typo until added here.
OTHER_PROGRAMS = {"cd", "export", "git", "gcloud", "curl", "printf", "base64", "sqlite3", "optuna-dashboard", "pip",
                  "source", ".venv/bin/mlflow", "mlflow"}
SHIPPED_FOLDERS = ("experiments/", "sweeps/", "dashboards/", "benchmarks/", "octft/", "tests/", "docs/")
# Run for real (outside --help) when every path they name is local: fast, and they write only into the working folder.
CHEAP = {("synth",), ("data", "audit"), ("data", "inspect")}
MAX_SYNTH_PARTICIPANTS = 32
README_MAX_LINES = 300


# ---------------------------------------------------------------- reading the documents
@dataclass(frozen=True)
class Command:
    """One simple command of a fenced block: its words after any `NAME=value` prefixes."""

    where: str  # "docs/sweeps.md:42"
    words: tuple[str, ...]
    text: str  # the logical line it came from

    @property
    def program(self) -> str:
        return self.words[0]

    @property
    def octft_args(self) -> list[str] | None:
        """The arguments after `octft`, `.venv/bin/octft` or `[~/.local/bin/]uv run octft`; None for other programs."""
        words = list(self.words)
        if words[0] in ("octft", ".venv/bin/octft"):
            return words[1:]
        if Path(words[0]).name == "uv" and words[1:3] == ["run", "octft"]:
            return words[3:]
        return None

    @property
    def has_placeholder(self) -> bool:
        return any("<" in word or ">" in word or "..." in word for word in self.words)

    def __str__(self) -> str:
        return f"{self.where}: {' '.join(self.words)}"


def _relative(path: Path) -> str:
    return str(path.relative_to(REPO))


def fenced_blocks(text: str) -> list[tuple[int, str, list[str]]]:
    """(line number of the first body line, language, body lines dedented to the fence) of every fenced block."""
    blocks, lines, index = [], text.split("\n"), 0
    while index < len(lines):
        opening = re.match(r"^(\s*)(`{3,})\s*([\w+-]*)", lines[index])
        if not opening:
            index += 1
            continue
        indent, fence, language = opening.group(1), opening.group(2), opening.group(3).lower()
        body, index = [], index + 1
        start = index + 1
        while index < len(lines) and not re.match(rf"^\s*{fence}\s*$", lines[index]):
            body.append(lines[index][len(indent):] if lines[index].startswith(indent) else lines[index].lstrip())
            index += 1
        blocks.append((start, language, body))
        index += 1
    return blocks


def outside_fences(text: str) -> str:
    """The document with every fenced block's lines blanked (line numbers kept)."""
    lines = text.split("\n")
    for start, _, body in fenced_blocks(text):
        for offset in range(-1, len(body) + 1):
            if 0 <= start - 1 + offset < len(lines):
                lines[start - 1 + offset] = ""
    return "\n".join(lines)


def _strip_comment(line: str) -> str:
    """`line` without a shell comment: a `#` at the start or after a blank, outside quotes."""
    quote = None
    for position, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (position == 0 or line[position - 1].isspace()):
            return line[:position].rstrip()
    return line.rstrip()


def logical_lines(language: str, body: list[str], start: int) -> list[tuple[int, str]]:
    """Commands as the shell reads them: backslash continuations and trailing `|` / `&&` joined, comments dropped."""
    if language == "console":
        body = [line[2:] if line.startswith("$ ") else "" for line in body]
    result, pending, pending_line = [], "", start
    for number, raw in enumerate(body, start=start):
        line = _strip_comment(raw)
        if not pending:
            pending_line = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        if re.search(r"(\|\||&&|\|)\s*$", pending):
            pending += " "
            continue
        if pending.strip():
            result.append((pending_line, pending.strip()))
        pending = ""
    assert not pending.strip(), f"line {pending_line}: a continuation runs past the end of its block"
    return result


def simple_commands(where: str, line: str) -> list[Command]:
    """The simple commands of one logical line (split at `&&`, `||`, `;`, `|`, `&`), recursing into gcloud's
    `--command "..."`."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = ""
    segments, current = [], []
    for token in lexer:
        if token and set(token) <= set(";&|"):
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    commands = []
    for words in segments:
        while words and words[0] in ("{", "}", "(", ")"):
            words = words[1:]
        while words and words[-1] in ("{", "}", "(", ")"):
            words = words[:-1]
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words = words[1:]  # an environment assignment for this command
        if not words:
            continue
        commands.append(Command(where, tuple(words), line))
        if words[0] == "gcloud":
            for index, word in enumerate(words):
                if word == "--command" and index + 1 < len(words):
                    commands += simple_commands(where, words[index + 1])
                elif word.startswith("--command="):
                    commands += simple_commands(where, word.split("=", 1)[1])
    return commands


def document_commands(path: Path) -> list[Command]:
    commands = []
    for start, language, body in fenced_blocks(path.read_text()):
        if language not in SHELL_BLOCKS:
            continue
        for number, line in logical_lines(language, body, start):
            commands += simple_commands(f"{_relative(path)}:{number}", line)
    return commands


ALL_COMMANDS = [command for document in DOCUMENTS for command in document_commands(document)]
OCTFT_COMMANDS = [command for command in ALL_COMMANDS if command.octft_args is not None]


def _ids(commands: list[Command]) -> list[str]:
    return [f"{command.where} {' '.join(command.words)[:80]}" for command in commands]


# ---------------------------------------------------------------- octft's parser
def parse_octft(args: list[str]):
    """`args` parsed as `octft.cli.main` parses them (overrides may follow options); the argparse message on failure."""
    parser = build_parser()
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parsed, rest = parser.parse_known_args(args)
    except SystemExit:
        pytest.fail(f"octft {' '.join(args)}: {stderr.getvalue().strip()}")
    stragglers = [token for token in rest if "=" in token and not token.startswith("-")]
    assert len(stragglers) == len(rest), f"octft {' '.join(args)}: unrecognised arguments {rest}"
    assert not stragglers or hasattr(parsed, "overrides"), f"octft {' '.join(args)}: takes no key=value {stragglers}"
    parsed.overrides = list(getattr(parsed, "overrides", None) or []) + stragglers
    return parsed


def subcommand_path(args: list[str]) -> tuple[str, ...]:
    """(`data`, `audit`), (`train`,), ...: the command words that select a subparser."""
    parser = build_parser()
    path: list[str] = []
    for word in args:
        subparsers = [action for action in parser._actions if action.__class__.__name__ == "_SubParsersAction"]
        if not subparsers or word not in subparsers[0].choices:
            break
        path.append(word)
        parser = subparsers[0].choices[word]
    return tuple(path)


def is_help(command: Command) -> bool:
    return any(word in ("--help", "-h") for word in command.octft_args or [])


def runs_here(command: Command) -> bool:
    """A command this test runs for real: `--help`, or a cheap command on local paths (placeholders aside)."""
    args = command.octft_args or []
    if is_help(command):
        return True
    if subcommand_path(args) not in CHEAP:
        return False
    if any(re.match(r"^([\w.-]+=)?(b2|s3|gs|https?)://", word) for word in args):
        return False
    try:
        parsed = parse_octft(args)
    except (AssertionError, pytest.fail.Exception):
        return False  # test_every_octft_command_parses_and_its_shipped_configs_load says why
    if getattr(parsed, "participants", None) and subcommand_path(args) == ("synth",):
        return parsed.participants <= MAX_SYNTH_PARTICIPANTS
    labels = getattr(parsed, "labels", None)
    return not labels or not Path(labels).is_absolute()


def is_cheap(command: Command) -> bool:
    return runs_here(command) and not is_help(command) and not command.has_placeholder


def _shipped_path_words(words: list[str]) -> list[str]:
    found = []
    for word in words:
        value = word.split("=", 1)[1] if "=" in word and not word.startswith("/") else word
        if value.startswith(SHIPPED_FOLDERS) and "<" not in value:
            found.append(value)
    return found


@pytest.fixture
def in_repo(monkeypatch):
    """Relative paths as a user in the checkout gives them; no store from the environment."""
    monkeypatch.chdir(REPO)
    for name in ("OCTFT_OPTUNA_STORAGE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------- every command parses
def test_the_documents_hold_commands():
    assert len(OCTFT_COMMANDS) >= 30, _ids(OCTFT_COMMANDS)
    assert any(command.octft_args == ["--help"] and command.program.endswith("uv") for command in OCTFT_COMMANDS)
    assert {("demo",), ("test",)} <= {tuple(c.words[1:]) for c in ALL_COMMANDS if c.program == "make"}


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=_ids(ALL_COMMANDS))
def test_every_command_is_one_octft_knows_or_an_expected_program(command):
    known = command.octft_args is not None or command.program in ("make", ".venv/bin/python") or (
        command.program in OTHER_PROGRAMS)
    assert known, f"{command}: unknown program {command.program!r} (a typo? else add it to OTHER_PROGRAMS)"
    for path in _shipped_path_words(list(command.words)):
        assert (REPO / path.rstrip("/")).exists(), f"{command}: {path} is not in the checkout"


@pytest.mark.parametrize("command", OCTFT_COMMANDS, ids=_ids(OCTFT_COMMANDS))
def test_placeholders_only_in_commands_that_cannot_run_here(command):
    assert not (command.has_placeholder and runs_here(command)), (
        f"{command}: this command could run as printed; give it real values instead of placeholders")


@pytest.mark.parametrize("command", OCTFT_COMMANDS, ids=_ids(OCTFT_COMMANDS))
def test_every_octft_command_parses_and_its_shipped_configs_load(command, in_repo):
    from octft.config import load_experiment, load_experiment_dict
    from octft.sweep.plan import load_launch_spec
    from octft.sweep.spec import load_sweep

    args = command.octft_args
    if is_help(command):
        return  # run for real below
    parsed = parse_octft(args)
    path = subcommand_path(args)
    assert path, f"{command}: no octft command"
    overrides = parsed.overrides
    if path == ("train",) or (path == ("checkpoint", "inspect")):
        load_experiment(parsed.config, overrides)
    elif path in (("data", "audit"), ("data", "cache")):
        load_experiment(parsed.config, overrides) if parsed.config else load_experiment_dict({}, overrides)
    elif path == ("smoke",):
        load_experiment(REPO / "experiments" / "smoke.yaml", overrides)
    elif path[0] in ("sweep", "promote", "report", "ui"):
        load_launch_spec(parsed.spec, overrides, getattr(parsed, "storage", None))
        source = getattr(parsed, "enqueue_from", None)
        if source and source.endswith(".yaml"):
            load_sweep(source)
    if path == ("predict",):
        assert re.match(r"^models:/[\w.-]+(@\w+|/\d+)$", parsed.model) or "<" in parsed.model, command


@pytest.mark.parametrize("command", [c for c in ALL_COMMANDS if c.program == "make"],
                         ids=_ids([c for c in ALL_COMMANDS if c.program == "make"]))
def test_every_make_command_names_a_target(command):
    # `make -n`: what it would run, run nothing (recursive makes get -n too).
    done = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(REPO), *command.words[1:]],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{command}: {done.stderr.strip()}"


@pytest.mark.parametrize("command", [c for c in ALL_COMMANDS if c.program == ".venv/bin/python"],
                         ids=_ids([c for c in ALL_COMMANDS if c.program == ".venv/bin/python"]))
def test_every_python_script_exists_and_takes_its_options(command):
    script = REPO / command.words[1]
    assert script.is_file(), f"{command}: no {command.words[1]}"
    source = script.read_text()
    for option in (word.split("=", 1)[0] for word in command.words[2:] if word.startswith("--")):
        assert f'"{option}"' in source, f"{command}: {script.name} has no option {option}"


@pytest.mark.parametrize("command", [c for c in ALL_COMMANDS if c.program == "source"],
                         ids=_ids([c for c in ALL_COMMANDS if c.program == "source"]))
def test_sourced_files_exist(command):
    if not (REPO / ".venv").is_dir():
        pytest.skip("no .venv in this checkout")
    assert (REPO / command.words[1]).is_file(), command


def test_mlflow_commands_take_their_options():
    commands = [c for c in ALL_COMMANDS if c.program in (".venv/bin/mlflow", "mlflow")]
    if not commands:
        pytest.skip("no mlflow command in the documents")
    import importlib

    for command in commands:
        group, verb = command.words[1:3]  # `mlflow models serve ...`: the click group of mlflow/models/cli.py
        click_command = importlib.import_module(f"mlflow.{group}.cli").commands.commands.get(verb)
        assert click_command is not None, f"{command}: mlflow {group} has no command {verb}"
        options = {option for parameter in click_command.params for option in parameter.opts}
        for option in (word for word in command.words[3:] if re.match(r"^--?[a-z]", word)):
            assert option in options, f"{command}: mlflow {group} {verb} has no option {option} ({sorted(options)})"


# ---------------------------------------------------------------- the cheap ones, for real
def _octft_executable() -> list[str]:
    script = Path(sys.executable).with_name("octft")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "octft.cli"]


def _run(argv: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


def _help_runs() -> list[tuple[str, list[str]]]:
    """(label, argv) of every printed --help command and of `--help` for every octft command the documents use."""
    runs, seen = [], set()
    for command in OCTFT_COMMANDS:
        if is_help(command):
            runs.append((str(command), list(command.words)))
        path = subcommand_path(command.octft_args)
        if path and path not in seen:
            seen.add(path)
            runs.append((f"octft {' '.join(path)} --help", ["octft", *path, "--help"]))
    return runs


@pytest.mark.parametrize("label, argv", _help_runs(), ids=[label[:90] for label, _ in _help_runs()])
def test_help_commands_run(label, argv):
    env = {}
    if argv[0] == "octft":
        argv = _octft_executable() + argv[1:]
    elif argv[0] == ".venv/bin/octft":
        if not (REPO / ".venv" / "bin" / "octft").is_file():
            pytest.skip("no .venv/bin/octft in this checkout")
    else:  # uv run octft ...
        uv = shutil.which(argv[0]) or shutil.which("uv") or str(Path.home() / ".local" / "bin" / "uv")
        if not Path(uv).is_file():
            pytest.skip("uv is not installed here")
        argv = [uv, *argv[1:]]
        env = {"UV_FROZEN": "1", "UV_NO_SYNC": "1"}  # run in .venv as it is: no lock or environment change from a test
    done = _run(argv, REPO, env)
    assert done.returncode == 0, f"{label}: {done.stderr[-1000:]}"
    assert done.stdout.startswith("usage: octft"), f"{label}: {done.stdout[:300]}"


def _cheap_sequences() -> list[tuple[str, list[Command]]]:
    by_document: dict[str, list[Command]] = {}
    for command in OCTFT_COMMANDS:
        if is_cheap(command):
            by_document.setdefault(command.where.split(":")[0], []).append(command)
    return sorted(by_document.items())


@pytest.mark.parametrize("document, commands", _cheap_sequences(), ids=[name for name, _ in _cheap_sequences()])
def test_cheap_commands_run_as_printed(document, commands, tmp_path):
    for folder in ("experiments", "sweeps", "dashboards"):
        (tmp_path / folder).symlink_to(REPO / folder)
    for command in commands:
        done = _run(_octft_executable() + command.octft_args, tmp_path)
        assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}"


def test_the_readme_runs_a_synthetic_release_through_the_audit():
    ran = [command.octft_args[:2] for _, commands in _cheap_sequences() for command in commands]
    assert ["data", "audit"] in ran and any(args[0] == "synth" for args in ran), ran


def test_the_checkpoint_conversion_snippet_makes_a_checkpoint_octft_loads(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from octft.models.checkpoint import inspect_checkpoint
    from octft.models.encoder import build_encoder

    readme = (REPO / "README.md").read_text()
    [snippet] = [body for _, language, body in fenced_blocks(readme) if language == "python" and
                 any("_grey.pt" in line for line in body)]
    source_name = re.search(r'torch\.load\("([^"]+)"', "\n".join(snippet)).group(1)
    target_name = re.search(r'torch\.save\(.*"([^"]+)"\)', "\n".join(snippet)).group(1)
    # A V-JEPA 2 pretraining checkpoint as its code writes one, of a micro RGB encoder.
    rgb = build_encoder("vit_micro", img_size=32, num_frames=4, in_chans=3)
    state = {f"module.backbone.{name}": tensor for name, tensor in rgb.state_dict().items()}
    torch.save({"encoder": state, "target_encoder": state, "predictor": {}, "epoch": 3}, tmp_path / source_name)
    monkeypatch.chdir(tmp_path)
    exec(compile("\n".join(snippet), "README.md (checkpoint conversion)", "exec"), {})
    grey = build_encoder("vit_micro", img_size=32, num_frames=4, in_chans=1)
    assert not inspect_checkpoint(tmp_path / source_name, grey).ok  # the RGB tubelet embedding does not fit
    report = inspect_checkpoint(tmp_path / target_name, grey)
    assert report.ok and report.source_key == "target_encoder", report.summary()


# ---------------------------------------------------------------- links and shape
def github_anchor(heading: str) -> str:
    text = re.sub(r"[`*_]", "", re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, counts = set(), {}
    for line in outside_fences(path.read_text()).split("\n"):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            anchor = github_anchor(heading.group(1))
            found.add(anchor if anchor not in counts else f"{anchor}-{counts[anchor]}")
            counts[anchor] = counts.get(anchor, 0) + 1
    return found


def links(path: Path) -> list[tuple[int, str]]:
    text = re.sub(r"`[^`\n]*`", "", outside_fences(path.read_text()))
    return [(text.count("\n", 0, match.start()) + 1, match.group(1))
            for match in re.finditer(r"\]\(([^)\s]+)\)", text)]


@pytest.mark.parametrize("document", DOCUMENTS, ids=[_relative(d) for d in DOCUMENTS])
def test_every_relative_link_and_anchor_resolves(document):
    for line, target in links(document):
        if re.match(r"^(https?|mailto):", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (document.parent / file_part).resolve() if file_part else document
        assert linked.exists(), f"{_relative(document)}:{line}: {target}: no such file"
        assert REPO in linked.parents or linked == REPO, f"{_relative(document)}:{line}: {target} leaves the checkout"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), (f"{_relative(document)}:{line}: {target}: no heading #{anchor} in "
                                               f"{_relative(linked)} (it has {sorted(anchors(linked))})")


@pytest.mark.parametrize("document", DOCUMENTS, ids=[_relative(d) for d in DOCUMENTS])
def test_commands_sit_in_fenced_blocks(document):
    # An indented code block is invisible to this test: commands go in ```bash blocks.
    for number, line in enumerate(outside_fences(document.read_text()).split("\n"), start=1):
        assert not re.match(r"^ {4,}(octft|make|\.venv/|uv run|PJRT_DEVICE=)", line), (
            f"{_relative(document)}:{number}: put this command in a fenced ```bash block: {line.strip()}")


def test_the_readme_is_a_short_start_that_links_every_reference_page():
    readme = REPO / "README.md"
    lines = readme.read_text().split("\n")
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move reference material to docs/"
    assert "## Contents" in lines
    linked = {(readme.parent / target.partition("#")[0]).resolve() for _, target in links(readme)}
    for page in DOCUMENTS[1:]:
        assert page.resolve() in linked, f"README.md does not link {_relative(page)}"
