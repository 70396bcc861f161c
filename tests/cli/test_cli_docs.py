"""Every command the docs show parses: each ``llmray ...`` line in a README/CONTRIBUTING/docs code block
(and ``python jobs/{pretrain,finetune}.py ...``, which take the same flags) is accepted by the parser
that ``llmray`` uses, so a renamed or removed flag fails here instead of in a new user's shell."""

from __future__ import annotations

import argparse
import ast
import re
import shlex
from pathlib import Path

import pytest

from llmray.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
JOBS = {"jobs/pretrain.py": "pretrain", "jobs/finetune.py": "finetune"}


def shell_commands(text: str) -> list[str]:
    """The commands of a markdown text's fenced code blocks, continuation lines joined."""
    commands: list[str] = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [ln.strip() for ln in joined.splitlines() if ln.strip()]
    return commands


def llmray_argv(command: str) -> list[str] | None:
    """``llmray pretrain --data x`` -> ``["pretrain", "--data", "x"]``; None for any other command."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        return None
    if "--" in words:  # ray job submit ... -- python jobs/pretrain.py ...
        words = words[words.index("--") + 1 :]
    if words[:1] == ["llmray"]:
        return words[1:]
    if len(words) > 1 and words[0].startswith("python") and words[1] in JOBS:
        rest = words[2:]
        return [JOBS[words[1]], *rest] if rest[:1] != ["merge"] else rest
    return None


def documented() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        for command in shell_commands(doc.read_text()):
            argv = llmray_argv(command)
            if argv is not None and argv[:1] != ["bench"]:  # bench NAME takes the script's own flags
                found.append((f"{doc.relative_to(ROOT)}: {command[:70]}", argv))
    return found


def _lenient_parser() -> argparse.ArgumentParser:
    """``llmray``'s parser with no flag required: a doc line may take them from ``--config run.yaml``."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in sub.choices.values():
        for action in command._actions:
            action.required = False
    return parser


DOCUMENTED = documented()


def test_the_docs_show_every_command():
    shown = {argv[0] for _, argv in DOCUMENTED if argv}
    assert {"pretrain", "finetune", "merge", "serve", "batch"} <= shown, shown


@pytest.mark.parametrize("where,argv", DOCUMENTED, ids=[w for w, _ in DOCUMENTED])
def test_a_documented_command_parses(where, argv, capsys):
    try:
        args = _lenient_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: {capsys.readouterr().err.strip() or e}")
    assert getattr(args, "func", None) is not None, where
    sub = next(a for a in _lenient_parser()._actions if isinstance(a, argparse._SubParsersAction))
    known = {o for a in sub.choices[argv[0]]._actions for o in a.option_strings}
    abbreviated = [w.split("=")[0] for w in argv if w.startswith("--") and w.split("=")[0] not in known]
    assert not abbreviated, f"{where}: {abbreviated} (argparse accepts a prefix; the docs spell flags out)"


def test_the_flags_named_in_prose_exist():
    """`llmray serve --lora NAME=DIR` in a sentence: each --flag is one of that command's options."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    wrong = []
    for doc in DOCS:
        for span in re.findall(r"`llmray ([a-z-]+)([^`]*)`", doc.read_text()):
            command, rest = span
            if command not in sub.choices or command == "bench":
                continue  # a dashboard's name, a global flag, bench's script flags
            known = {o for a in sub.choices[command]._actions for o in a.option_strings}
            wrong += [f"{doc.name}: llmray {command} {f}" for f in re.findall(r"--[a-z][a-z0-9-]*", rest)
                      if f not in known]  # fmt: skip
    assert not wrong, wrong


def test_a_renamed_flag_is_caught():
    docs = "```bash\nllmray pretrain --data x --out o --max-stepz 5   # a typo\n```\n"
    (argv,) = [llmray_argv(c) for c in shell_commands(docs)]
    with pytest.raises(SystemExit):
        _lenient_parser().parse_args(argv)


ISSUE_NUMBER = re.compile(r"\bissues?[ -]#?\d+", re.I)  # "issue 3", "issue-4 run", "Issues 12"


def _help_texts() -> dict[str, str]:
    """Every ``llmray X --help`` text, and the docstrings that ``llmray bench X --help`` prints."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    texts = {f"llmray {name} --help": p.format_help() for name, p in sub.choices.items()}
    texts["llmray --help"] = parser.format_help()
    for script in sorted((ROOT / "bench").glob("*.py")):
        source = script.read_text()
        if "__doc__" in source:  # its argparse description is the module docstring
            texts[f"{script.relative_to(ROOT)} --help"] = ast.get_docstring(ast.parse(source)) or ""
    return texts


def test_no_issue_numbers_in_the_docs_or_help():
    """A reader has no issue tracker: the docs and --help say what a thing is, not which issue asked for it."""
    texts = {str(doc.relative_to(ROOT)): doc.read_text() for doc in DOCS} | _help_texts()
    found = [f"{where}: {m.group(0)!r}" for where, text in texts.items() for m in ISSUE_NUMBER.finditer(text)]
    assert not found, found
    assert ISSUE_NUMBER.search("the issue-4 run") and ISSUE_NUMBER.search("Issue 3's anchors")


def test_local_job_submit_recipes_disable_token_auth_first():
    """Once any local Ray run wrote ~/.ray/auth_token, `ray start` turns on token auth and a plain `ray job
    submit` is refused ("Missing authentication token"): every local recipe sets RAY_AUTH_MODE=disabled
    before `ray start`, and the README says why."""
    recipes = []
    for doc in DOCS:
        for block in re.findall(r"^```[a-z]*\n(.*?)^```", doc.read_text(), flags=re.S | re.M):
            if "ray start --head" in block and "ray job submit" in block:
                recipes.append(doc.name)
                assert "RAY_AUTH_MODE=disabled" in block.split("ray start --head")[0], doc.name
    assert {"training.md", "deploy.md"} <= set(recipes), recipes
    readme = (ROOT / "README.md").read_text()
    assert "RAY_AUTH_MODE=disabled" in readme and "Missing authentication token" in readme


def test_every_test_the_reliability_table_names_exists():
    """docs/reliability.md's first column names test files (under tests/reliability/ unless a folder is given)
    and functions (a trailing ``*`` is a prefix): a moved or renamed test must move its row too."""
    rows = re.findall(r"^\| `([^`]+)` \|", (ROOT / "docs" / "reliability.md").read_text(), flags=re.M)
    assert len(rows) >= 8, rows
    missing = []
    for row in rows:
        file, _, func = row.partition("::")
        path = ROOT / file if "/" in file else ROOT / "tests" / "reliability" / file
        text = path.read_text() if path.exists() else ""
        if not text or (func and f"def {func.rstrip('*')}" not in text):
            missing.append(row)
    assert not missing, missing


REPO_PATH = re.compile(
    r"(?<![\w/.-])((?:tests|bench|llmray|cluster|jobs|docs)/[\w/.-]*\w\.(?:py|ya?ml|json|sh|png))"
)


def test_every_linked_or_named_file_exists():
    """Markdown links to local files resolve, and a path like tests/cluster/x.py named in prose exists."""
    missing = []
    for doc in [*DOCS, ROOT / "CHANGELOG.md"]:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if not target.startswith(("http://", "https://", "#", "mailto:")):
                if not (doc.parent / target.split("#")[0]).exists():
                    missing.append(f"{doc.name}: link {target}")
        if doc.name != "CHANGELOG.md":  # the changelog names files as they were then
            for path in REPO_PATH.findall(text):
                if "NAME" not in path and not (ROOT / path).exists():
                    missing.append(f"{doc.name}: {path}")
    assert not missing, missing
    assert REPO_PATH.findall("the run (`tests/cluster/gone.py`), ../bench/x.py") == ["tests/cluster/gone.py"]


CURL_OUTPUT = re.compile(r"\bcurl\b[^|;&]*?-[a-zA-Z]*o\s+(\S+)")  # curl -fsSL -o FILE URL


def test_every_data_path_the_docs_read_is_fetched_where_a_reader_finds_it():
    """A fresh clone has no .data/: each ``.data/...`` file a doc names is downloaded by a command in a doc's
    code block, and a doc that names it without fetching it links the doc that does."""
    fetched: dict[str, Path] = {}
    for doc in DOCS:
        for command in shell_commands(doc.read_text()):
            for target in CURL_OUTPUT.findall(command):
                fetched[target] = doc
    named = [(doc, path) for doc in DOCS for path in re.findall(r"(\.data/[\w/-]+\.\w+)", doc.read_text())]
    assert named and fetched, (named, fetched)
    missing = [f"{doc.name}: {path}" for doc, path in named if path not in fetched]
    unlinked = [f"{doc.name}: {path}" for doc, path in named
                if path in fetched and fetched[path] != doc and fetched[path].name not in doc.read_text()]  # fmt: skip
    assert not missing and not unlinked, (missing, unlinked)
    assert CURL_OUTPUT.findall("mkdir -p .data/x && curl -fsSL -o .data/x/in.txt https://h/in.txt") == [
        ".data/x/in.txt"
    ]


def test_plots_are_shown_inline_where_they_help():
    """The training loss, the serving latency and the results overview are images in the page, not only
    links; the architecture is a diagram at the top of its page, which the README links."""

    def images(name: str) -> list[str]:
        return re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", (ROOT / name).read_text())

    assert any("train_" in p and p.endswith(".png") for p in images("docs/training.md"))
    assert any("serve_latency" in p for p in images("docs/serving.md"))
    assert any("results_overview" in p for p in images("README.md"))
    architecture = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    assert re.match(r"# [^\n]+\n+```\n[^`]*──▶", architecture), "ARCHITECTURE.md opens with its diagram"
    assert "(docs/ARCHITECTURE.md)" in (ROOT / "README.md").read_text()
