"""The report's Markdown as one self-contained HTML file: figures inlined as base64 ``data:`` URIs.

Handles exactly the Markdown :mod:`th_edit.app.report` writes: ``#`` headings, paragraphs, ``- `` lists,
pipe tables (header, alignment row, body), image lines ``![alt](file.png)``, ``**bold**`` and ```code```.
No dependency beyond the standard library.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

__all__ = ["markdown_to_html"]

_STYLE = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.45}"
          "table{border-collapse:collapse;margin:0.8rem 0;font-size:0.92rem}th,td{border:1px solid #ccc;"
          "padding:0.25rem 0.5rem;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
          "img{max-width:100%}code{background:#f3f3f3;padding:0 0.2rem}.summary{font-size:1.05rem}")


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"\*(.+?)\*", r"<em>\1</em>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _image(line: str, folder: Path) -> str | None:
    m = re.fullmatch(r"!\[(.*?)\]\((.+?)\)", line.strip())
    if not m:
        return None
    alt, src = m.groups()
    path = folder / src
    if path.is_file():
        src = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="{src}"><figcaption>{_inline(alt)}</figcaption></figure>'


def _table(lines: list[str]) -> str:
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    head, body = cells[0], cells[2:] if len(cells) > 1 and set("".join(cells[1])) <= set(":- ") else cells[1:]
    out = ["<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr></thead><tbody>"]
    out += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body]
    return "\n".join(out + ["</tbody></table>"])


def markdown_to_html(text: str, folder: str | Path, *, title: str = "th_edit report") -> str:
    """``text`` (the report's Markdown) as a complete HTML document; images are read from ``folder``."""
    folder = Path(folder)
    blocks: list[str] = []
    lines = text.splitlines()
    i, first_paragraph = 0, True
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif m := re.match(r"(#{1,6}) (.*)", line):
            level = len(m.group(1))
            blocks.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
            i += 1
        elif line.lstrip().startswith("|"):
            j = i
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            blocks.append(_table(lines[i:j]))
            i = j
        elif line.startswith("- "):
            j = i
            while j < len(lines) and lines[j].startswith("- "):
                j += 1
            blocks.append("<ul>" + "".join(f"<li>{_inline(l[2:])}</li>" for l in lines[i:j]) + "</ul>")
            i = j
        elif (img := _image(line, folder)) is not None:
            blocks.append(img)
            i += 1
        else:
            j = i
            while j < len(lines) and lines[j].strip() and not re.match(r"#|\||- |!\[", lines[j].lstrip()):
                j += 1
            j = max(j, i + 1)
            cls = ' class="summary"' if first_paragraph else ""
            first_paragraph = False
            blocks.append(f"<p{cls}>" + " ".join(_inline(l) for l in lines[i:j]) + "</p>")
            i = j
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(blocks) + "\n</body></html>\n")
