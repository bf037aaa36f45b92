"""The commands the docs tell people to run parse with the current CLI: an option renamed or removed in the code
and left in a doc would otherwise be found by the first person who pastes it. Each `mixmae ...`, `python -m
mixmae_scale ...` and `deepspeed ... --module mixmae_scale.cli ...` line of a shell block is parsed as typed, and
where it names a shipped profile its `--cluster` file and `--set` keys are resolved against the typed config; the
`mixmae SUBCOMMAND --option` mentions in the prose must name subcommands and options that exist; the benchmark
scripts the docs run must exist and take the options given; every repository path a doc names must exist."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from mixmae_scale.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([*(ROOT / "docs").rglob("*.md"), ROOT / "README.md", ROOT / "benchmarks" / "README.md",
               ROOT / "ds_configs" / "README.md", ROOT / "data_tools" / "README.md"])
# Files whose comments tell people what to type (usage lines of the launch scripts and examples).
COMMENTED = sorted(p for p in (ROOT / "launch").rglob("*") if p.suffix in (".sh", ".sbatch", ".yaml", ".example"))
SHELL = ("", "bash", "sh", "console", "shell")
# What starts the CLI, after optional VAR=value assignments and a `cd ... &&`.
CLI = re.compile(r"^(?:\S*/)?(?:mixmae|python3? -m mixmae_scale(?:\.cli)?|deepspeed\b.*?--module mixmae_scale\.cli)"
                 r"(?:\s+(?P<args>.*))?$")
# A line the doc shows failing on purpose says so in its comment.
FAILS_ON_PURPOSE = ("did you mean", "refused")


def shell_lines(text: str) -> list[str]:
    """The lines of a markdown file's shell code blocks, fenced or indented by four spaces, continuation
    backslashes joined."""
    lines, block, lang = [], None, ""
    for line in text.splitlines():
        if block is None and line.startswith("    ") and line.strip():
            lines.append(line.strip())
        elif line.startswith("```"):
            if block is None:
                block, lang = [], line[3:].strip()
            else:
                if lang in SHELL:
                    lines += "\n".join(block).replace("\\\n", " ").splitlines()
                block = None
        elif block is not None:
            block.append(line)
    return lines


def prose_code(text: str) -> list[str]:
    """The inline code spans outside code blocks."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]


def cli_argv(line: str) -> tuple[list[str], str] | None:
    """The arguments a shell line gives the CLI, and the line's comment; None for a line that does not run it.
    A Slurm script's line counts as the `mixmae pretrain` it starts."""
    line, _, comment = line.partition(" #")
    line = line.strip()
    if line.startswith("#"):
        return None
    for part in re.split(r"\s*(?:&&|;|\|\|)\s*", line):
        words = part.split()
        script = re.match(r"^python3? data_tools/make_shards\.py (.*)$", part)
        if script:  # `mixmae shards` as a plain script
            return ["shards", *shlex.split(script.group(1))], comment
        sbatch = re.match(r"^PROFILE=(\S+) (?:\S+=\S+ )*sbatch launch/slurm/\S+\.sbatch(.*)$", part)
        if sbatch:  # the scripts hand the arguments after them to `mixmae pretrain --profile $PROFILE`
            return ["pretrain", "--profile", sbatch.group(1), *shlex.split(re.sub(r"\[.*\]", "", sbatch.group(2)))], \
                comment
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value before the command
            words.pop(0)
        match = CLI.match(" ".join(words))
        if match:
            return shlex.split(match.group("args") or ""), comment
    return None


def parse(argv: list[str]) -> tuple[argparse.Namespace | None, str]:
    """argparse's namespace, or None and its error line (stderr's last line)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return build_parser().parse_args(argv), ""
    except SystemExit as stop:
        return (argparse.Namespace(), "") if stop.code == 0 else (None, err.getvalue().strip().splitlines()[-1])


def unknown_words(argv: list[str]) -> list[str]:
    """The subcommand words and options of `argv` its parser does not have under their exact names: argparse's
    errors stop at a missing required argument before they get to an unknown option, and it takes a prefix of an
    option (`--val-frac`), which a new option can make ambiguous."""
    parser, wrong = build_parser(), []
    words = list(argv)
    while words:
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers or words[0].startswith("-"):
            break
        if words[0] not in subparsers[0].choices:
            return [words[0]]
        parser = subparsers[0].choices[words.pop(0)]
    known = {option for action in parser._actions for option in action.option_strings}
    for word in words:
        if word.startswith("--") and word.split("=")[0] not in known:
            wrong.append(word)
    return wrong


def doc_commands() -> list[tuple[str, list[str], str]]:
    found = []
    for path in DOCS:
        for line in shell_lines(path.read_text()):
            if (argv := cli_argv(line)) is not None:
                found.append((str(path.relative_to(ROOT)), *argv))
    for path in COMMENTED:
        for line in path.read_text().replace("\\\n", " ").splitlines():
            if line.lstrip().startswith("#") and (argv := cli_argv(line.lstrip().lstrip("#").strip())) is not None:
                found.append((str(path.relative_to(ROOT)), *argv))
    return found


COMMANDS = doc_commands()


def test_the_docs_hold_the_commands_this_test_is_meant_to_check():
    """A change to how the docs mark their blocks must not leave this test checking nothing."""
    named = {argv[0] for _, argv, _ in COMMANDS if argv}
    assert {"pretrain", "finetune", "eval", "shards", "launch", "plan", "export", "probe", "scaling"} <= named, named
    assert len(COMMANDS) >= 60, len(COMMANDS)


@pytest.mark.parametrize(("doc", "argv", "comment"), COMMANDS, ids=[f"{d}:{' '.join(a)[:60]}" for d, a, _ in COMMANDS])
def test_every_command_in_the_docs_parses_and_its_profile_keys_resolve(doc, argv, comment):
    from mixmae_scale.config import ConfigError, load_config

    args, error = parse(argv)
    assert args is not None, f"{doc}: `mixmae {' '.join(argv)}` does not parse: {error}"
    assert not unknown_words(argv), f"{doc}: `mixmae {' '.join(argv)}`: not its parser's: {unknown_words(argv)}"
    profile = getattr(args, "profile", None)
    if not isinstance(profile, str) or not profile.isidentifier():
        return  # no profile, or a placeholder (PROFILE) or a file of the reader's own
    cluster = getattr(args, "cluster", None)
    cluster = str(ROOT / cluster) if cluster and (ROOT / cluster).is_file() else None
    overrides = list(getattr(args, "overrides", None) or [])
    if any(word in comment for word in FAILS_ON_PURPOSE):
        with pytest.raises(ConfigError):
            load_config(profile, cluster, overrides)
    else:
        load_config(profile, cluster, overrides)


def prose_mentions() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCS:
        for span in prose_code(path.read_text()):
            if (argv := cli_argv(span)) is not None and argv[0]:
                found.append((str(path.relative_to(ROOT)), argv[0]))
    return found


def test_every_subcommand_and_option_the_prose_names_exists():
    """A mention such as `mixmae eval --precision auto` leaves out required arguments: only the words given
    count, an unknown subcommand or option fails."""
    wrong = [f"{doc}: `mixmae {' '.join(argv)}`: {unknown_words(argv)}" for doc, argv in prose_mentions()
             if unknown_words(argv)]
    assert not wrong, "\n".join(wrong)
    assert len(prose_mentions()) >= 40


def script_runs() -> list[tuple[str, str, list[str]]]:
    """`python benchmarks/X.py --opt ...` and `bash benchmarks/...`/`bash launch/...` anywhere in the docs."""
    found = []
    for path in DOCS:
        for match in re.finditer(r"(?:python3?|bash)\s+((?:benchmarks|launch|data_tools|tests)/[\w/.\-]+)([^`\n|;]*)",
                                 path.read_text()):
            options = re.findall(r"(?<![\w-])(--[a-z][\w-]*)", match.group(2))
            found.append((str(path.relative_to(ROOT)), match.group(1), options))
    return found


def test_every_script_the_docs_run_exists_and_takes_the_options_given():
    wrong = []
    for doc, script, options in script_runs():
        path = ROOT / script
        if not path.is_file():
            wrong.append(f"{doc}: {script} does not exist")
            continue
        source = path.read_text()
        # A script may take its options from a sibling's (finetune_demo.py from seg_demo.py's demo_arguments).
        source += "".join((path.parent / f"{name}.py").read_text() for name in re.findall(r"^from (\w+) import",
                          source, re.M) if (path.parent / f"{name}.py").is_file())
        # A shell script passes "$@" on, its options are the Python script's; make_shards.py's are the CLI's (above).
        if path.suffix == ".py" and script != "data_tools/make_shards.py":
            wrong += [f"{doc}: {script} has no option {option}" for option in options
                      if f'"{option}"' not in source and f"'{option}'" not in source]
    assert not wrong, "\n".join(wrong)
    assert len(script_runs()) >= 20


def test_every_repository_path_the_docs_name_exists():
    """A path such as `launch/slurm/pretrain.sbatch` or `benchmarks/results/x.json`; `benchmarks/README.md`'s
    `results/x.json` is read from benchmarks/. Placeholders (upper case) and globs are left out."""
    top = r"(?:benchmarks|launch|docs|tests|mixmae_scale|ds_configs|data_tools)"
    wrong = []
    for path in DOCS:
        text = path.read_text()
        names = re.findall(rf"(?<![\w/.\-]){top}/[\w/.\-]*\w", text)
        if path.name == "README.md" and path.parent.name == "benchmarks":
            names += [f"benchmarks/{name}" for name in re.findall(r"(?<![\w/.\-])results/[\w/.\-]*\w", text)]
        wrong += [f"{path.relative_to(ROOT)}: {name}" for name in names
                  if not re.search(r"[A-Z]{3,}|\*", name) and not (ROOT / name).exists()]
    assert not wrong, "\n".join(wrong)
