"""The docs: the generated config reference is current, and every relative link resolves."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from speed.config import reference

ROOT = Path(__file__).resolve().parents[1]

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)


def test_config_reference_is_current():
    generated = reference.render()
    committed = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert generated == committed, "docs/config.md is stale; run python -m speed.config.reference"


def test_check_names_the_command(tmp_path, capsys):
    stale = tmp_path / "config.md"
    stale.write_text("old\n", encoding="utf-8")
    assert reference.main(["--check", "--output", str(stale)]) == 1
    assert "run python -m speed.config.reference" in capsys.readouterr().err
    assert reference.main(["--output", str(stale)]) == 0
    assert reference.main(["--check", "--output", str(stale)]) == 0


def _relative_links(text: str) -> List[str]:
    text = _INLINE_CODE.sub("", _FENCE.sub("", text))
    targets = _LINK.findall(text) + _REF_DEF.findall(text)
    return [t for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#|//)", t, re.I)]


def _anchors(text: str) -> set:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -1 for repeats."""
    seen: dict = {}
    anchors = set()
    for line in _FENCE.sub("", text).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_relative_links_point_to_existing_files():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for doc in docs:
        text = doc.read_text(encoding="utf-8")
        local = re.findall(r"\]\(#([^)\s]+)\)", _INLINE_CODE.sub("", _FENCE.sub("", text)))
        for anchor in local:
            if anchor not in _anchors(text):
                broken.append(f"{doc.relative_to(ROOT)}: #{anchor} (no such heading)")
        for target in _relative_links(text):
            path, _, anchor = target.partition("#")
            path = path.split("?", 1)[0]
            resolved = doc.parent / path
            if path and not resolved.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
            elif anchor and resolved.suffix == ".md" and resolved.is_file():
                if anchor not in _anchors(resolved.read_text(encoding="utf-8")):
                    broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken relative links:\n" + "\n".join(broken)


# -- the generator on a schema like the one being extended (choices, help, nesting) -------------


@dataclass
class _Inner:
    """Inner section docstring."""

    depth: int = 2  # trailing comment
    # a comment above
    # on two lines
    width: float = field(
        default=0.5,
        metadata={"choices": (0.5, 1.0)},
    )


@dataclass
class _Outer:
    # Leading block of the section.
    mode: str = field(default="a", metadata={"choices": ("a", "b")})  # a | b
    label: Optional[str] = field(default=None, metadata={"help": "from help; beats | the comment"})  # ignored
    names: List[str] = field(default_factory=lambda: ["x"])
    rate: float = field(default=0.5, metadata={"min": 0, "max": 1, "min_exclusive": True})
    cpus: Any = field(default="auto", metadata={"min": 0, "min_exclusive": True, "choices": ("auto",),
                                                "hint": "auto: decided by the job"})
    inner: _Inner = field(default_factory=_Inner)  # the inner part


def test_generator_reads_metadata_comments_and_nesting():
    sections = {s.key: s for s in reference.collect_sections(_Outer, "top.")}
    assert list(sections) == ["top", "top.inner"]
    outer, inner = sections["top"], sections["top.inner"]
    assert outer.heading == "Leading block of the section."
    rows = {r[0]: r for r in outer.rows}
    assert rows["`top.mode`"][1:] == ("`str`", '`"a"`', "One of: `a`, `b`.")
    assert rows["`top.label`"][1:] == ("`str or null`", "`null`", "from help; beats \\| the comment")
    assert rows["`top.names`"][1:] == ("`list[str]`", '`["x"]`', "")
    assert rows["`top.rate`"][3] == "Allowed: a number `(0, 1]`."
    assert rows["`top.cpus`"][3] == "Allowed: a number `> 0`, or `auto` (auto: decided by the job)."
    assert inner.heading == "Inner section docstring.\n\nthe inner part"
    rows = {r[0]: r for r in inner.rows}
    assert rows["`top.inner.depth`"][3] == "trailing comment"
    assert rows["`top.inner.width`"][3] == "a comment above on two lines. One of: `0.5`, `1.0`."
    assert reference.render() == reference.render()
