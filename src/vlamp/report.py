"""One small document, written twice: as Markdown and as a self-contained HTML page. The bench
report and the diagnose report are both built from it."""

from __future__ import annotations

import html
import os
from pathlib import Path

from vlamp.io import write_text_atomic

_STYLE = ("<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}"
          "td,th{padding:2px 8px;text-align:right}td:first-child{text-align:left}</style>")


class Report:
    """Paragraphs, bullet lists, tables and images, in order.

    Example:
        >>> r = Report("vlamp diagnose")
        >>> r.paragraph("Run: runs/fp16."); r.table([["module", "risk"], ["trunk.0.qkv", "3.1"]])
        >>> r.write("out")  # doctest: +SKIP
    """

    def __init__(self, title: str) -> None:
        self.title = title
        self.md: list[str] = [f"# {title}", ""]
        self.page: list[str] = [f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>",
                                _STYLE, f"<h1>{html.escape(title)}</h1>"]

    def heading(self, text: str) -> None:
        self.md += [f"## {text}", ""]
        self.page.append(f"<h2>{html.escape(text)}</h2>")

    def paragraph(self, text: str, warn: bool = False) -> None:
        self.md += [f"> {text}" if warn else text, ""]
        self.page.append(f'<p style="color:#b00"><b>{html.escape(text)}</b></p>' if warn
                         else f"<p>{html.escape(text)}</p>")

    def bullets(self, lines: list[str]) -> None:
        if not lines:
            return
        self.md += [f"- {line}" for line in lines] + [""]
        self.page.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>")

    def table(self, rows: list[list[str]]) -> None:
        """A header row, then the body."""
        self.md += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        self.md += ["| " + " | ".join(r) + " |" for r in rows[1:]] + [""]
        self.page.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in rows[0]) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                                   for r in rows[1:]) + "</table>")

    def image(self, name: str) -> None:
        """An image file next to the report (``name`` relative to it)."""
        alt = name.rsplit(".", 1)[0]
        self.md += [f"![{alt}]({name})", ""]
        self.page.append(f'<p><img src="{html.escape(name)}" alt="{html.escape(alt)}"></p>')

    def write(self, out: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Writes ``out/report.md`` and ``out/report.html`` (each atomically); returns their paths."""
        out = Path(out)
        paths = out / "report.md", out / "report.html"
        write_text_atomic(paths[0], "\n".join(self.md))
        write_text_atomic(paths[1], "\n".join(self.page))
        return paths
