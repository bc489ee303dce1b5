"""The original's table: rows = defenses, columns = clean and each attack (accuracy / targeted success rate),
with N and a 95% confidence interval; written as JSON (one metadata file per result) and Markdown."""

from __future__ import annotations

from dataclasses import dataclass, field

from rmc.defense.registry import DEFENSES, STATIC
from rmc.evaluation.stats import Rate

BASE_LABELS = {"adversarial": "Adv. trained", "denoising": "Denoising block"}   # the original's row names


def row_label(base: str, defense: str) -> str:
    if base == "standard":
        return DEFENSES.label(defense)
    prefix = BASE_LABELS.get(base, base)
    return prefix if defense == STATIC else f"{prefix} + {DEFENSES.label(defense)}"


def row_order(results: dict) -> list[tuple[str, str]]:
    """(base, defense) in the original's order: every static model first (None, Adv. trained, Denoising block),
    then the first base's defenses (DeepNN, WebNN, RMC), then the other bases' ("Adv. trained + RMC", ...)."""
    pairs = [(b, d) for b, sets in results.items() for defenses in sets.values() for d in defenses]
    pairs = list(dict.fromkeys(pairs))
    bases = list(results)
    return sorted(pairs, key=lambda p: (p[1] != STATIC, p[0] != bases[0], bases.index(p[0])))


@dataclass
class Cell:
    accuracy: Rate
    success: Rate | None = None     # targeted attacks: fraction predicted as the attacker's target

    def text(self) -> str:
        return str(self.accuracy) if self.success is None else f"{self.accuracy} / {100 * self.success.value:.1f}"

    def to_dict(self) -> dict:
        d = {"accuracy": self.accuracy.to_dict()}
        if self.success is not None:
            d["attack_success"] = self.success.to_dict()
        return d


def cell_from_records(records: list[dict]) -> Cell:
    acc = Rate(sum(r["pred"] == r["label"] for r in records), len(records))
    if records and "target" in records[0]:
        return Cell(acc, Rate(sum(r["pred"] == r["target"] for r in records), len(records)))
    return Cell(acc)


@dataclass
class Table:
    columns: list[str]                                       # evaluation set names
    column_notes: dict[str, str] = field(default_factory=dict)   # e.g. "transfer", "defense-aware"
    rows: dict[str, dict[str, Cell]] = field(default_factory=dict)
    corner: str = "defense"                                  # heading of the row-label column
    notes: list[str] = field(default_factory=list)           # lines printed under the table
    title: str = ""                                          # printed above the table, if given
    appendix: list["Table"] = field(default_factory=list)    # further tables printed after this one (attack rows)

    @classmethod
    def from_results(cls, results: dict, notes: dict[str, str] | None = None) -> "Table":
        columns = list(dict.fromkeys(name for sets in results.values() for name in sets))
        rows: dict[str, dict[str, Cell]] = {}
        for base, defense in row_order(results):
            rows[row_label(base, defense)] = {name: cell_from_records(defenses[defense])
                                              for name, defenses in results[base].items() if defense in defenses}
        return cls(columns, notes or {}, rows)

    def header(self) -> list[str]:
        return [self.corner] + [f"{c} ({self.column_notes[c]})" if c in self.column_notes else c for c in self.columns]

    def common_n(self) -> int | None:
        """The N most cells have (a cell with another N, e.g. RMC on fewer inputs, states its own)."""
        ns = [cell.accuracy.n for r in self.rows.values() for cell in r.values()]
        return max(set(ns), key=ns.count) if ns else None

    def cells(self) -> list[list[str]]:
        common = self.common_n()
        def text(cell: Cell) -> str:
            return cell.text() + ("" if cell.accuracy.n == common else f" (N = {cell.accuracy.n})")
        return [[label] + [text(r[c]) if c in r else "-" for c in self.columns] for label, r in self.rows.items()]

    def n_line(self) -> str:
        common = self.common_n()
        others = {cell.accuracy.n for r in self.rows.values() for cell in r.values()} - {common}
        return f"N = {common} per cell" + (" unless the cell states its own" if others else "")

    def markdown(self) -> str:
        head = self.header()
        lines = [f"### {self.title}", ""] if self.title else []
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in self.cells()]
        legend = ("Accuracy % [95% Wilson CI]; targeted columns: accuracy / attack success rate %. "
                  + self.n_line() + ".")
        return ("\n".join(lines) + "\n\n" + legend + "\n" + "".join(f"\n{note}\n" for note in self.notes)
                + "".join("\n" + t.markdown() for t in self.appendix))

    def plain(self) -> str:
        grid = [self.header()] + self.cells()
        widths = [max(len(r[i]) for r in grid) for i in range(len(grid[0]))]
        fmt = lambda r: "  ".join(s.ljust(w) for s, w in zip(r, widths, strict=True))  # noqa: E731
        lines = ([self.title] if self.title else []) + [fmt(grid[0]), "  ".join("-" * w for w in widths)]
        lines += [fmt(r) for r in grid[1:]]
        return ("\n".join(lines) + "\n" + self.n_line() + "; accuracy % [95% CI]; targeted: accuracy / success %\n"
                + "".join(f"{note}\n" for note in self.notes) + "".join("\n" + t.plain() for t in self.appendix))

    def to_dict(self) -> dict:
        return {"title": self.title, "columns": self.columns, "column_notes": self.column_notes, "corner": self.corner,
                "notes": self.notes,
                "rows": {label: {c: cell.to_dict() for c, cell in r.items()} for label, r in self.rows.items()},
                "appendix": [t.to_dict() for t in self.appendix]}
