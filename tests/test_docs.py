"""The documentation stays true of the code.

- docs/cli.md is exactly what `patchflow.cli_reference.cli_reference()` generates from the CLI's parser;
- every relative link and image in README.md and docs/*.md points to a file in the repository (and, for a
  `file.md#anchor` link, to a heading there); README.md links nothing outside the repository;
- every ```toml block in docs/data.md is a config that `patchflow.config.load_config` accepts;
- every `patchflow <command>` in the README's and the docs' code is a real subcommand, and every command line in
  the guides written for users to copy (quickstart, data, converting) parses with the real parser.

Each check is a function that returns the problems it finds; the tests run it on the real files and on a file
made wrong on purpose, so a check that can no longer fail is noticed.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path
from urllib.parse import unquote

from patchflow.cli import build_parser
from patchflow.cli_reference import cli_reference

REPO = Path(__file__).resolve().parents[1]
CLI_MD = REPO / "docs" / "cli.md"
REGENERATE = "python -m patchflow.cli_reference > docs/cli.md"
MARKDOWN = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
GUIDES = [REPO / "docs" / name for name in ("quickstart.md", "data.md", "converting.md")]
SHELL_LANGS = ("", "bash", "sh", "shell", "console")


# ---- docs/cli.md ----------------------------------------------------------------------------------------------
def cli_doc_problem(path: Path, expected: str | None = None) -> str | None:
    """None when `path` holds exactly the generated reference, else what is wrong and the command that fixes it."""
    expected = cli_reference() if expected is None else expected
    if not path.is_file():
        return f"{path} is missing: generate it with `{REGENERATE}`"
    found = path.read_text(encoding="utf-8")
    if found == expected:
        return None
    old, new = found.splitlines(), expected.splitlines()
    line = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
    show = lambda lines: repr(lines[line]) if line < len(lines) else "(end of file)"  # noqa: E731
    return (f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path} is not what patchflow/cli.py's parser "
            f"generates (first difference at line {line + 1}: the file has {show(old)}, the parser gives "
            f"{show(new)}); regenerate it with `{REGENERATE}`")


def test_cli_md_is_generated_from_the_parser():
    problem = cli_doc_problem(CLI_MD)
    assert problem is None, problem


def test_a_stale_or_missing_cli_md_is_caught(tmp_path):
    text = cli_reference()
    stale = tmp_path / "cli.md"
    stale.write_text(text.replace("| `--", "| `---", 1), encoding="utf-8")  # one flag renamed
    problem = cli_doc_problem(stale, text)
    assert problem is not None and REGENERATE in problem and "line" in problem
    stale.write_text(text + "an edit by hand\n", encoding="utf-8")
    assert REGENERATE in cli_doc_problem(stale, text)
    assert REGENERATE in cli_doc_problem(tmp_path / "missing.md", text)
    stale.write_text(text, encoding="utf-8")
    assert cli_doc_problem(stale, text) is None


def test_the_reference_follows_the_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.add_parser("frobnicate", help="a command added by this test")
    p.add_argument("thing", help="what to frobnicate")
    p.add_argument("--level", type=int, default=3, choices=[1, 2, 3], help="how much | a pipe, <escaped>")
    p.add_argument("--out", required=True)
    p.add_argument("--tag", action="append", default=[], metavar="TAG")
    text = cli_reference(parser)
    assert text != cli_reference()
    assert "| [`patchflow frobnicate`](#patchflow-frobnicate) | a command added by this test |" in text
    assert "## patchflow frobnicate" in text
    assert "patchflow frobnicate [--level {1,2,3}] --out OUT [--tag TAG] thing\n" in text
    assert "| `--level` | `{1,2,3}` | `3` | 1, 2, 3 | how much \\| a pipe, &lt;escaped&gt; |" in text
    assert "| `--out` (required) | `OUT` |" in text and "| `--tag` (repeatable) | `TAG` |" in text
    for name in (a.dest for a in sub._choices_actions):  # every real command has its section
        assert f"\n## patchflow {name}\n" in text


# ---- links ----------------------------------------------------------------------------------------------------
FENCE = re.compile(r"^([ \t]*)(`{3,}|~{3,})([^\n]*)\n(.*?)^\1\2[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^[ \t]*\[[^\]]+\]:[ \t]*<?(\S+?)>?(?:[ \t]+.*)?$", re.M)
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*\b(?:href|src)\s*=\s*[\"']([^\"']*)[\"']", re.I)
BARE_URL = re.compile(r"(?:https?://|www\.)\S+", re.I)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _blank(match: re.Match) -> str:
    return re.sub(r"[^\n]", " ", match.group(0))


def prose(text: str) -> str:
    """The Markdown without fenced code blocks and code spans (replaced by spaces: offsets and lines are kept)."""
    return CODE_SPAN.sub(_blank, FENCE.sub(_blank, text))


def link_targets(text: str) -> list[str]:
    """Targets of inline links and images, reference definitions and HTML <a href> / <img src>, outside code."""
    text = prose(text)
    return [m.group(1) for pattern in (LINK, REFERENCE, HTML_LINK) for m in pattern.finditer(text)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: links reduced to their text, lower case, punctuation dropped, spaces -> -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", FENCE.sub(_blank, path.read_text(encoding="utf-8")), re.M):
        base = slug(m.group(1))
        n = found.get(base, 0)
        found[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def link_problems(path: Path, repo: Path = REPO, front_page: bool = False) -> list[str]:
    """What is wrong with the links of one Markdown file: targets that do not exist, point outside the repository,
    or name a missing heading; on the front page (README.md) also any link out of the repository."""
    text = path.read_text(encoding="utf-8")
    name = path.relative_to(repo) if path.is_relative_to(repo) else path
    problems = []
    for target in link_targets(text):
        if SCHEME.match(target):
            if front_page:
                problems.append(f"{name}: links outside the repository: {target}")
            continue  # another file may link out; only the front page must not
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part)
        if file_part.startswith("/"):
            problems.append(f"{name}: absolute path {target!r}: links must be relative to the file")
            continue
        dest = (path.parent / file_part).resolve() if file_part else path.resolve()
        if not dest.is_relative_to(repo.resolve()):
            problems.append(f"{name}: {target!r} points outside the repository")
        elif not dest.exists():
            problems.append(f"{name}: {target!r} does not exist")
        elif anchor and dest.suffix == ".md" and dest.is_file() and anchor not in anchors(dest):
            problems.append(f"{name}: {target!r}: {dest.name} has no heading with the anchor #{anchor}")
    if front_page:
        for m in BARE_URL.finditer(prose(text)):  # GitHub turns a bare URL in prose into a link
            problems.append(f"{name}: a bare URL in the text becomes a link out of the repository: {m.group(0)} "
                            f"(put it in `code` if it is an address to type)")
    return problems


def test_links_point_into_the_repository():
    assert len(MARKDOWN) >= 8, MARKDOWN
    problems = [p for path in MARKDOWN for p in link_problems(path, front_page=path.name == "README.md")]
    assert not problems, "\n".join(problems)


def test_the_link_check_finds_bad_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Second part\n", encoding="utf-8")
    (tmp_path / "pic.png").write_bytes(b"")
    good = ("[a](docs/a.md) [b](docs/a.md#second-part) ![p](pic.png) [self](#top) `[x](missing.md)`\n"
            "```\n[y](missing.md) http://example.com\n```\n# Top\nrun `http://127.0.0.1:7860`\n")
    readme = tmp_path / "README.md"
    readme.write_text(good, encoding="utf-8")
    assert link_problems(readme, tmp_path, front_page=True) == []
    bad = ("[gone](docs/b.md) [anchor](docs/a.md#third) ![pic](nopic.png) [out](../outside.md) [abs](/etc/x.md)\n"
           "[web](https://example.com) see http://example.org\n[ref]: docs/none.md\n")
    readme.write_text(bad, encoding="utf-8")
    problems = "\n".join(link_problems(readme, tmp_path, front_page=True))
    for expected in ("docs/b.md' does not exist", "no heading with the anchor #third", "nopic.png' does not exist",
                     "points outside the repository", "absolute path", "links outside the repository: https://",
                     "bare URL", "docs/none.md' does not exist"):
        assert expected in problems, (expected, problems)
    assert "https://" not in "\n".join(link_problems(readme, tmp_path, front_page=False))  # other files may link out


# ---- docs/data.md's configs -----------------------------------------------------------------------------------
def fenced(text: str, langs) -> list[tuple[int, str]]:
    """(line number, body) of the fenced blocks whose language is one of `langs`."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(4)) for m in FENCE.finditer(text)
            if m.group(3).strip().lower() in langs]


def config_problems(markdown: Path, tmp_path: Path) -> tuple[list[str], list]:
    """(problems, loaded configs) of the ```toml blocks of a Markdown file, each written to a file and loaded."""
    from patchflow.config import ConfigError, load_config

    problems, configs = [], []
    for i, (line, body) in enumerate(fenced(markdown.read_text(encoding="utf-8"), ("toml",))):
        path = tmp_path / f"{markdown.stem}-{i}.toml"
        path.write_text(body, encoding="utf-8")
        try:
            configs.append(load_config(path))
        except ConfigError as e:
            problems.append(f"{markdown.name}, the toml block at line {line}: {e}")
    return problems, configs


def test_data_md_configs_load(tmp_path):
    problems, configs = config_problems(REPO / "docs" / "data.md", tmp_path)
    assert not problems, "\n".join(problems)
    kinds = {(c.model.arch, c.data.dataset) for c in configs}
    for kind in (("dit", "folder"), ("autoencoder", "folder"), ("mmdit", "captions"), ("dit", "video")):
        assert kind in kinds, f"docs/data.md has no example config for model.arch, data.dataset = {kind}"
    assert any(c.codec.source != "identity" for c in configs), "docs/data.md has no latent-space example"


def test_the_config_check_finds_a_bad_config(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("```toml\n[data]\ndataset = \"folder\"\npath = \"x\"\nimage_size = 64\n```\n"
                   "```toml\n[model]\npreset = \"DiT-S/2\"\n[data]\ndataset = \"digits\"\n```\n", encoding="utf-8")
    problems, configs = config_problems(doc, tmp_path)
    assert len(problems) == 1 and "line 1" in problems[0] and "does not match the data" in problems[0], problems
    assert len(configs) == 1


# ---- commands ------------------------------------------------------------------------------------------------
SUBCOMMAND = re.compile(r"(?:^|(?<=[\s`$(;&|]))patchflow[ \t]+([a-z][\w-]*)", re.M)  # not COMMAND, RUN: placeholders
SHELL_COMMENT = re.compile(r"(?:^|(?<=\s))#.*$", re.M)


def subcommands() -> set[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def code_of(text: str) -> list[str]:
    """Shell code blocks and inline code spans: where commands are written."""
    blocks = [SHELL_COMMENT.sub("", body) for _, body in fenced(text, SHELL_LANGS)]
    spans = [m.group(2) for m in CODE_SPAN.finditer(FENCE.sub(_blank, text))]
    return blocks + spans


def unknown_subcommands(path: Path) -> list[str]:
    known = subcommands()
    name = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    return [f"{name}: `patchflow {word}` is not a command (commands: {', '.join(sorted(known))})"
            for code in code_of(path.read_text(encoding="utf-8")) for word in SUBCOMMAND.findall(code)
            if word not in known]


def command_lines(text: str) -> list[tuple[str, list[str]]]:
    """(the line, patchflow's arguments) of every patchflow command in the shell blocks of a Markdown text."""
    out = []
    for _, body in fenced(text, SHELL_LANGS):
        for line in body.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split, lexer.commenters = True, "#"
            segment: list[str] = []
            for token in [*lexer, ";"]:
                if token and set(token) <= set("();<>|&"):  # a command ends at a separator or a redirection
                    if "patchflow" in segment:
                        out.append((line.strip(), segment[segment.index("patchflow") + 1:]))
                    segment = [] if token != ">" else ["(redirect)"]
                else:
                    segment.append(token)
    return out


def parse_problems(path: Path) -> list[str]:
    parser = build_parser()
    problems = []
    for line, args in command_lines(path.read_text(encoding="utf-8")):
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(args)
        except SystemExit:
            problems.append(f"{path.name}: `{line}` does not parse: {err.getvalue().strip().splitlines()[-1]}")
    return problems


def test_quickstart_names_real_commands():
    quickstart = REPO / "docs" / "quickstart.md"
    named = {w for code in code_of(quickstart.read_text(encoding="utf-8")) for w in SUBCOMMAND.findall(code)}
    assert {"demo", "train", "sample", "eval", "serve", "report"} <= named, named
    problems = [p for path in MARKDOWN for p in unknown_subcommands(path)]
    assert not problems, "\n".join(problems)


def test_guide_commands_parse():
    lines = 0
    problems = []
    for path in GUIDES:
        lines += len(command_lines(path.read_text(encoding="utf-8")))
        problems += parse_problems(path)
    assert lines >= 30, f"only {lines} patchflow command lines found in {[p.name for p in GUIDES]}"
    assert not problems, "\n".join(problems)


def test_the_command_checks_find_mistakes(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("```bash\npatchflow sampel runs/x --out a.png\n"
                   "patchflow sample runs/x --lable 7 --out a.png   # a comment\n"
                   "PATCHFLOW_CACHE=/tmp/c patchflow train digits \\\n  --set train.steps=2 && patchflow eval runs/x\n"
                   "python -m patchflow.cli_reference > docs/cli.md   # patchflow is not run here\n```\n"
                   "and `patchflow frob`\n", encoding="utf-8")
    assert [a for _, a in command_lines(doc.read_text())] == [
        ["sampel", "runs/x", "--out", "a.png"], ["sample", "runs/x", "--lable", "7", "--out", "a.png"],
        ["train", "digits", "--set", "train.steps=2"], ["eval", "runs/x"]]
    problems = "\n".join(parse_problems(doc))
    assert "sampel" in problems and "--lable" in problems and "train digits" not in problems, problems
    assert {p.split("`")[1] for p in unknown_subcommands(doc)} == {"patchflow sampel", "patchflow frob"}

