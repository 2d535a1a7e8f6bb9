"""Job reports: a markdown file with tables and PNG figures, written atomically and logged to MLflow.

Every finetune / evaluation / sweep job ends with one report::

    rep = Report("Cell-type annotation", out_dir)
    rep.text("Finetuned on the reference split, predicted on the query split.")
    rep.table("Query metrics", [{"method": "scGPT", "accuracy": 0.91}, {"method": "logreg", "accuracy": 0.93}])
    fig = rep.figure("confusion")          # a matplotlib Figure; saved as confusion.png
    ...
    path = rep.write()                     # out_dir/report.md (+ PNGs, + results.json)
    rep.log_to_mlflow(client, run_id)      # the same files as run artifacts under `report/`
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from data_ingest.atomic import atomic_directory

REPORT_FILE = "report.md"
RESULTS_FILE = "results.json"
ARTIFACT_DIR = "report"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A GitHub markdown table; columns in first-seen order over all rows."""
    if not rows:
        return "_(no rows)_\n"
    cols: list[str] = []
    for row in rows:
        cols += [c for c in row if c not in cols]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in cols) + " |" for row in rows]
    return "\n".join(lines) + "\n"


class Report:
    """Sections (text, tables, figures) in order; `write` renders them into `out_dir` atomically."""

    def __init__(self, title: str, out_dir: str | Path):
        self.title = title
        self.out_dir = Path(out_dir)
        self._sections: list[tuple[str, Any]] = []
        self._figures: dict[str, Any] = {}
        self.results: dict[str, Any] = {}
        """Machine-readable results (written to results.json, logged as MLflow metrics by callers)."""

    def text(self, markdown: str) -> None:
        self._sections.append(("text", markdown.strip() + "\n"))

    def table(self, title: str, rows: list[dict[str, Any]]) -> None:
        self._sections.append(("table", (title, [dict(r) for r in rows])))
        self.results.setdefault("tables", {})[title] = [dict(r) for r in rows]

    def figure(self, name: str, width: float = 6.0, height: float = 4.5):
        """A new matplotlib figure saved as `<name>.png` and embedded at this point of the report."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"figure name {name!r}: use letters, digits, '-' and '_'")
        fig = plt.figure(figsize=(width, height))
        self._figures[name] = fig
        self._sections.append(("figure", name))
        return fig

    def render(self) -> str:
        out = [f"# {self.title}\n"]
        for kind, body in self._sections:
            if kind == "text":
                out.append(body)
            elif kind == "table":
                title, rows = body
                out.append(f"### {title}\n\n{markdown_table(rows)}")
            else:
                out.append(f"![{body}]({body}.png)\n")
        return "\n".join(out)

    def write(self) -> Path:
        """Write report.md, the PNGs and results.json to `out_dir` (replaced as a whole); returns report.md."""
        import matplotlib.pyplot as plt

        with atomic_directory(self.out_dir) as tmp:
            for name, fig in self._figures.items():
                fig.savefig(tmp / f"{name}.png", dpi=110, bbox_inches="tight")
                plt.close(fig)
            (tmp / REPORT_FILE).write_text(self.render())
            (tmp / RESULTS_FILE).write_text(json.dumps(self.results, indent=2, default=str))
        return self.out_dir / REPORT_FILE

    def log_to_mlflow(self, client, run_id: str) -> None:
        """Log the written report directory as run artifacts under `report/`."""
        client.log_artifacts(run_id, str(self.out_dir), artifact_path=ARTIFACT_DIR)
