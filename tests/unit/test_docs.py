"""The reference pages in docs/ that are generated from the code stay equal to it."""

from __future__ import annotations

import re

from app.settings import settings_markdown
from models.records import RejectReason
from tests.support.helpers import ROOT

DOCS = ROOT / "docs"


def block(page: str, name: str) -> str:
    text = (DOCS / page).read_text()
    start = text.index(f"<!-- {name}:begin -->") + len(f"<!-- {name}:begin -->\n")
    return text[start : text.index(f"<!-- {name}:end -->")]


def test_the_settings_page_matches_the_model() -> None:
    assert block("settings.md", "settings") == settings_markdown(), "run: millstream settings --markdown"


def test_the_reliability_page_lists_every_reject_reason_once() -> None:
    listed = re.findall(r"^\| `([a-z_]+)` \|", block("reliability.md", "reasons"), re.MULTILINE)
    assert sorted(listed) == sorted(reason.value for reason in RejectReason)
    assert len(listed) == len(set(listed))


def test_every_docs_page_is_linked_from_the_readme() -> None:
    readme = (DOCS.parent / "README.md").read_text()
    for page in DOCS.glob("*.md"):
        assert f"(docs/{page.name})" in readme, page.name
