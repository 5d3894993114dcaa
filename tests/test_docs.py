"""The documentation: README.md and docs/*.md stay short, link only to what exists, and name only real options.

* Every relative Markdown link in README.md, docs/*.md and bench/README.md
  resolves to an existing file or folder, and a `#anchor` to a heading of
  the target (GitHub's slugs: lowercase, punctuation other than hyphens and
  spaces dropped, spaces turned into hyphens, `-1`, `-2` for repeats).
* Every command-line option (`--something`) that README.md or docs/*.md
  names exists in the `--help` of the command it belongs to. The rule that
  says which command that is (`owner_of_options`):

  - the unit is one line: a line of prose, or a logical line of a code block
    (backslash continuations joined); in a code line a single-quoted string
    (`ray exec cluster.yaml '...'`) is a unit of its own;
  - an option belongs to the nearest command before it in its unit: one of
    the project's scripts (`orchestration/sweep.py`, `python -m wsml.train`,
    `bench/gpu.py`, ...; `cluster.slurm.sh` and `scripts/demo.sh` pass their
    arguments to orchestration/sweep.py) or another tool (`ray`, `mlflow`,
    `pip`, `pytest`, `sbatch`, `rsync`, ...; `scripts/test.sh` runs pytest),
    whose options are not checked here;
  - an option with no command before it in its unit must exist in the
    `--help` of at least one of the project's scripts.

  The project's parsers are built in-process where the script exposes a
  function for it (orchestration/sweep.py's `parse_args`, wsml/train.py's
  `_parser`); every other script runs `--help` once, in a subprocess.

Runs in seconds: no service is started.
"""
from __future__ import annotations

import contextlib
import functools
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINKED = [*DOCS, ROOT / "bench" / "README.md"]
README_MAX_BYTES = 15 * 1024

# --------------------------------------------------------------------------- Markdown


@functools.cache
def blocks(path: Path) -> tuple[list[str], list[str]]:
    """(prose lines, code lines) of a Markdown file: fenced and indented code blocks apart from the rest.

    A code line has its backslash continuations joined; a prose line is blank where the file has code."""
    prose, code = [], []
    fence = None
    indented = False
    previous_blank = True
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if fence:
            prose.append("")
            if stripped.startswith(fence):
                fence = None
            elif line.endswith("\\"):
                pending += line[:-1] + " "
            else:
                code.append(pending + line)
                pending = ""
            continue
        if stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
            prose.append("")
            continue
        indented = bool(stripped) and line.startswith(("    ", "\t")) and (previous_blank or indented)
        previous_blank = not stripped
        if indented:
            prose.append("")
            if line.endswith("\\"):
                pending += line[:-1] + " "
            else:
                code.append(pending + line)
                pending = ""
        else:
            prose.append(line)
    return prose, code


def slug(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)     # a link in a heading: its text
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@functools.cache
def anchors(path: Path) -> set[str]:
    prose, _ = blocks(path)
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


LINK = re.compile(r"\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")


def links(path: Path) -> list[str]:
    """Targets of the Markdown links of a file, outside code blocks and code spans."""
    prose, _ = blocks(path)
    text = re.sub(r"`[^`]*`", "", "\n".join(prose))
    return LINK.findall(text)


def broken_links(path: Path) -> list[str]:
    bad = []
    for target in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):          # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    return bad


# --------------------------------------------------------------------------- commands and their options

# The project's commands, by the script path or module that names them in the docs.
PROJECT = re.compile(
    r"(?P<path>(?:orchestration|bench)/\w+\.py|cluster\.slurm\.sh|scripts/\w+\.sh)"
    r"|(?:-m\s+)?(?P<module>orchestration\.\w+|wsml\.train|wsml\.data\.(?:prepare|download))\b(?!\.)")
FORWARD = {"cluster.slurm.sh": "orchestration/sweep.py",      # arguments after the script go to the sweep
           "scripts/demo.sh": "orchestration/sweep.py",
           "scripts/test.sh": "pytest"}
# Another tool, where a command starts: at the start of the unit or a code span, after a shell separator or a
# path (.venv/bin/mlflow), or an #SBATCH line.
OTHER = re.compile(
    r"(?:^|(?<=[\s`'\"(;&|/]))"
    r"(?P<tool>ray|mlflow|optuna-dashboard|pip|pytest|sbatch|srun|scancel|squeue|scontrol|rsync|ssh|aws|git|tail|tmux|apt-get|#SBATCH)"
    r"(?=[\s`]|$)")
OPTION = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")


def script_of(m: re.Match) -> str | None:
    """The command a match names: a script of the project, `other:<tool>`, or None (a module without a CLI)."""
    path, module = m.group("path"), m.group("module")
    if path in FORWARD:
        return FORWARD[path]
    if path and path.startswith("scripts/"):
        return f"other:{path}"               # set-up scripts, not checked
    script = path or (module.replace(".", "/") + ".py" if module.startswith("orchestration.") else module)
    file = ROOT / (script if "/" in script else script.replace(".", "/") + ".py")
    if not file.is_file() or '__name__ == "__main__"' not in file.read_text():
        return None
    return script


def units(path: Path) -> list[str]:
    """The lines an option is attributed within (see the module docstring)."""
    prose, code = blocks(path)
    out = [line for line in prose if line.strip()]
    for line in code:
        quoted = re.findall(r"'[^']*'", line)
        out.append(re.sub(r"'[^']*'", "''", line))
        out.extend(q[1:-1] for q in quoted)
    return out


def owner_of_options(unit: str) -> list[tuple[str, str | None]]:
    """(option, command) for every option of a unit; command None: no command before it; 'other:<tool>'."""
    marks = [(m.start(), cmd) for m in PROJECT.finditer(unit) if (cmd := script_of(m))]
    marks += [(m.start(), f"other:{m.group('tool').lstrip('#').lower()}") for m in OTHER.finditer(unit)]
    marks.sort()
    out = []
    for m in OPTION.finditer(unit):
        before = [cmd for pos, cmd in marks if pos < m.start()]
        cmd = before[-1] if before else None
        if cmd == "pytest":
            cmd = "other:pytest"
        out.append((m.group(), cmd))
    return out


def _help_in_process(fn, *args) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        fn(*args)
    return buf.getvalue()


def help_text(script: str) -> str:
    if script == "orchestration/sweep.py":
        from orchestration.sweep import parse_args
        return _help_in_process(parse_args, ["--help"])
    if script == "wsml.train":
        from wsml.train import _parser
        return _parser().format_help()
    argv = ["-m", script] if "/" not in script else [script]
    got = subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, f"{script} --help failed:\n{got.stderr[-2000:]}"
    return got.stdout


@pytest.fixture(scope="module")
def options_of():
    """script -> the options its --help names, each script asked once."""
    cache: dict[str, set[str]] = {}

    def get(script: str) -> set[str]:
        if script not in cache:
            cache[script] = set(OPTION.findall(help_text(script)))
        return cache[script]
    return get


# The project's scripts with options, for options named with no command before them.
ALL_SCRIPTS = ["orchestration/sweep.py", "wsml.train", "orchestration/aggregate.py", "wsml.data.prepare",
               "wsml.data.download", "orchestration/image_cache.py", "orchestration/ray_nodes.py",
               "orchestration/cluster/spot_watch.py"]


def unknown_options(path: Path, options_of) -> list[str]:
    bad = []
    for unit in units(path):
        for opt, cmd in owner_of_options(unit):
            if cmd and cmd.startswith("other:"):
                continue
            if cmd is None:
                if not any(opt in options_of(s) for s in ALL_SCRIPTS):
                    bad.append(f"{opt} (no command before it; no script of the project has it): {unit.strip()[:120]}")
            elif opt not in options_of(cmd):
                bad.append(f"{opt} is not an option of {cmd}: {unit.strip()[:120]}")
    return bad


# --------------------------------------------------------------------------- tests

def test_readme_is_short():
    size = README.stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, more than {README_MAX_BYTES}: move detail to docs/"


@pytest.mark.parametrize("path", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(path):
    assert path.is_file()
    assert broken_links(path) == []


def test_the_readme_links_every_docs_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README)}
    assert [str(p.relative_to(ROOT)) for p in DOCS[1:] if p.resolve() not in linked] == []


def test_docs_pages_named_in_the_code_exist():
    """A page of docs/ that a module, script, space file or cluster file names is there."""
    files = [p for d in ("wsml", "orchestration", "search_spaces", "scripts", "bench", "tests", ".ci")
             for p in (ROOT / d).rglob("*") if p.is_file() and p.suffix in ("", ".py", ".sh", ".yaml", ".md")]
    files += [*ROOT.glob("*.yaml"), *ROOT.glob("*.sh"), *ROOT.glob("*.toml")]
    named = {(f.relative_to(ROOT), page) for f in files
             for page in re.findall(r"\bdocs/[\w-]+\.md", f.read_text(errors="replace"))}
    assert named, "no file names a docs page: the pattern is wrong"
    assert [f"{f}: {page}" for f, page in sorted(named) if not (ROOT / page).is_file()] == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_options_exist(path, options_of):
    assert unknown_options(path, options_of) == []


def test_the_option_rule(options_of, tmp_path):
    """The attribution picks the nearest command, keeps other tools' options out, and catches a bogus option."""
    assert owner_of_options("sbatch --nodes=4 --export=ALL cluster.slurm.sh --num-samples 48") == [
        ("--nodes", "other:sbatch"), ("--export", "other:sbatch"), ("--num-samples", "orchestration/sweep.py")]
    assert owner_of_options("ray exec cluster.yaml '' --tmux") == [("--tmux", "other:ray")]
    assert owner_of_options("`python -m wsml.train --skip-bad-images` (in a sweep: ...)") == [
        ("--skip-bad-images", "wsml.train")]
    assert owner_of_options("bash scripts/test.sh --fast") == [("--fast", "other:pytest")]
    assert owner_of_options("pass `--resume`") == [("--resume", None)]
    page = tmp_path / "page.md"
    page.write_text("# A page\n\n    ray exec cluster.yaml 'python orchestration/sweep.py --dataset digits "
                    "--no-such-option' --tmux\n\nThen `python orchestration/aggregate.py --final-seeds 3`, "
                    "and `--also-no-such-option`.\nOr `--third-no-such-option` on a line of its own.\n")
    bad = unknown_options(page, options_of)
    expected = ["--no-such-option is not an option of orchestration/sweep.py",
                "--final-seeds is not an option of orchestration/aggregate.py",
                "--also-no-such-option is not an option of orchestration/aggregate.py",
                "--third-no-such-option (no command before it"]
    assert len(bad) == len(expected) and all(any(e in b for b in bad) for e in expected), bad


def test_the_link_rule(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## The driver was killed: `--resume`\n")
    page = tmp_path / "page.md"
    page.write_text("# Page: one, two\n\n[a](other.md#the-driver-was-killed---resume) [b](#page-one-two) "
                    "[c](other.md#nope) [d](missing.md) [e](https://example.com/x.md) `[f](code.md)`\n\n"
                    "    [g](in-code.md)\n")
    assert [b.split(":")[0] for b in broken_links(page)] == ["other.md#nope", "missing.md"]
