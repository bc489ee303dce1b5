"""`rmc report`: one self-contained HTML page (figures embedded as base64 PNG, no script, opens offline) plus each
figure as a PNG, from a run directory's records only (rmc.evaluation.run_records; the defense is never re-run).

Layout written (default: into the run directory):
    report.html
    figures/robustness.png, drift.png, anatomy.png, purity.png
"""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Callable
from pathlib import Path
from typing import Sequence

from rmc.evaluation import figure_data as fd
from rmc.evaluation import figures as fg
from rmc.evaluation.attack_rows import NOTES as ATTACK_NOTES
from rmc.evaluation.figure_data import ATTACK_ROW_DEFENSES
from rmc.evaluation.report import Cell, Table, cell_from_records, row_label, row_order
from rmc.evaluation.run_records import AWARE, RunRecords
from rmc.evaluation.stats import Rate
from rmc.io import write_text
from rmc.paths import inside

FIGURES_DIR = "figures"          # beside report.html
ROUNDS_GLOB = "*rounds*.png"     # the defense-aware per-round figure (attack_rows draws it; the page only embeds it)
MAX_EMBEDDED_EXTRA = 4           # per-round PNGs embedded at most (a run has one per base model and attack)
BASE_ORDER = ("standard", "adversarial", "denoising")          # base models of a run without a readable config
KIND_ORDER = ("transfer", "defense-aware", "worst case")        # rows of the attack table, as the text table
CSS = """body{font-family:sans-serif;max-width:1100px;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}td,th{border:1px solid #bbb;padding:3px 6px;text-align:left}
th{background:#eee}img{max-width:100%;border:1px solid #ddd}.missing{background:#fff4e0;border:1px solid #e0a040;
padding:.5em 1em}.note{font-size:13px;color:#444}figure{margin:1.5em 0}figcaption{font-size:13px;color:#333}"""


# ---------------------------------------------------------------- tables

def _cell_from_dict(d: dict) -> Cell:
    def rate(r: dict) -> Rate:
        return Rate(int(r["hits"]), int(r["n"]))

    return Cell(rate(d["accuracy"]), rate(d["attack_success"]) if "attack_success" in d else None)


def _row_order(label: str, bases: list[str]) -> tuple:
    """results.json keeps rows in alphabetical order (sorted keys): back to the text table's order."""
    canonical = [row_label(b, d) for b, d in row_order({b: {"": dict.fromkeys(fd.CURVE_DEFENSES)} for b in bases})]
    kinds = [f"[{k}]" for k in KIND_ORDER]
    kind = next((i for i, k in enumerate(kinds) if label.endswith(k)), len(kinds))
    return (canonical.index(label) if label in canonical else len(canonical), kind)


def table_from_dict(d: dict, bases: Sequence[str] = BASE_ORDER) -> Table:
    """A Table back from results.json's `table` (Table.to_dict), appendix included; rows in the text table's
    order for these base models."""
    items = sorted(d.get("rows", {}).items(), key=lambda kv: _row_order(kv[0], list(bases)))   # stable sort
    rows = {label: {c: _cell_from_dict(cell) for c, cell in r.items()} for label, r in items}
    return Table(list(d.get("columns", [])), dict(d.get("column_notes", {})), rows, d.get("corner", "defense"),
                 list(d.get("notes", [])), d.get("title", ""),
                 [table_from_dict(a, bases) for a in d.get("appendix", [])])


def tables(run: RunRecords) -> tuple[Table, str]:
    """The run's table (results.json's, or rebuilt from the records of a partial run) and where it came from."""
    if run.results and isinstance(run.results.get("table"), dict):
        return table_from_dict(run.results["table"], run.config_bases), "results.json"
    results: dict = {}
    notes = {}
    rows: dict = {}
    columns: list[str] = []
    for s in run.sets:
        recs = run.records(s) if s.folder.is_dir() else {}
        if not recs:
            continue
        if not s.attack_row:
            results.setdefault(s.base, {})[s.name] = recs
            notes[s.name] = s.kind
            continue
        for defense in ATTACK_ROW_DEFENSES:   # the attack rows' columns, as rmc.evaluation.attack_rows
            if defense in recs and not (s.kind == AWARE and defense != s.defense):
                col = row_label(s.base, defense)
                columns += [col] if col not in columns else []
                rows.setdefault(f"{s.name} [{s.kind}]", {})[col] = cell_from_records(recs[defense])
    t = Table.from_results(results, notes)
    t.notes.append("Rebuilt from the per-input records of a run that has not finished (no results.json).")
    if rows:
        t.appendix.append(Table(columns, {}, rows, corner="attack", notes=list(ATTACK_NOTES),
                                title="Attack rows, rebuilt from the records (no worst case until the run ends)"))
    return t, "the records (partial run)"


def table_html(t: Table) -> str:
    out = f"<h3>{html.escape(t.title)}</h3>" if t.title else ""
    out += "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in t.header()) + "</tr>"
    out += "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in t.cells())
    out += "</table>"
    out += (f"<p class='note'>Accuracy % [95% Wilson CI]; targeted columns: accuracy / attack success rate %. "
            f"{html.escape(t.n_line())}.</p>")
    out += "".join(f"<p class='note'>{html.escape(n)}</p>" for n in t.notes)
    return out + "".join(table_html(a) for a in t.appendix)


# ---------------------------------------------------------------- figures

def _img(data: bytes, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>"


def _figure(data: bytes, alt: str, caption: str) -> str:
    return f"<figure>{_img(data, alt)}<figcaption>{caption}</figcaption></figure>"


def _old_records_note(run: RunRecords) -> str | None:
    for s in run.sets:
        if s.folder.is_dir():
            for r in run.rmc(s):
                return None if "neighbours" in r else (
                    "per-input report fields (neighbour labels, confidences, adaptation loss, weight drift): this "
                    "run's RMC records predate them, so the anatomy, purity and drift figures are empty; a new run "
                    "records them")
    return None


def build(run: RunRecords, fig_dir: Path, log: Callable[[str], None]) -> str:
    """The page's body; writes each figure under `fig_dir`."""
    parts: list[str] = []
    old = _old_records_note(run)

    t, source = tables(run)
    parts.append(f"<h2>Tables</h2><p class='note'>From {html.escape(source)}.</p>{table_html(t)}")

    series = fd.curve_data(run)
    png = fg.save_png(fg.draw_curve(series), fig_dir / "robustness.png")
    n_eps = len({p.eps for s in series for p in s.points if p.eps > 0})
    sweep = "" if n_eps > 1 else (" This run has one attacked eps per attack: for a curve with more points run "
                                  "<code>rmc run --eps-sweep 0.05 0.1 0.15 0.2</code> (or list them in attack.pgd).")
    parts.append("<h2>Robustness curve</h2>" + _figure(
        png, "robustness curve", "Accuracy against the L-inf radius eps for each defense; eps 0 is the clean accuracy "
        "on the same inputs. Solid: transfer attacks (crafted against the static model, the original paper's "
        "setting, which overstates robustness); dashed: defense-aware attacks (FPA / GMSA, Chen et al. ICLR 2022), "
        "the honest number. Bands: 95% Wilson intervals." + sweep))

    drift = fd.drift_data(run)
    png = fg.save_png(fg.draw_drift(drift), fig_dir / "drift.png")
    episodic = run.mode == "episodic"
    parts.append("<h2>Online drift</h2>" + _figure(
        png, "online drift", "RMC's running accuracy along each record stream (clean set solid) and the L2 distance "
        "of its adapted weights from the static ones after each input (adaptation and calibration)."
        + (" This run is episodic: every input starts from the static weights, so nothing drifts." if episodic
           else "")))

    items = fd.anatomy_data(run)
    images = []
    for a in items:
        s = next(s for s in run.sets if s.base == a.base and s.name == a.set_name)
        got = run.images(s, [a.index])
        images.append(None if got is None else got[0])
    png = fg.save_png(fg.draw_anatomy(items, images, run.class_name), fig_dir / "anatomy.png")
    parts.append("<h2>Per-input anatomy</h2>" + _figure(
        png, "per-input anatomy", "A few inputs RMC classifies right and wrong (clean set and the first attacked "
        "set): the input, the labels of its K nearest D' examples (clean copy blue, adversarial copies orange), "
        "the static and the adapted model's predictions with their softmax confidence, and the adaptation's "
        "training loss per epoch."))

    groups = fd.purity_data(run)
    png = fg.save_png(fg.draw_purity(groups), fig_dir / "purity.png")
    parts.append("<h2>Neighbour purity vs correctness</h2>" + _figure(
        png, "neighbour purity", f"RMC's accuracy in {fd.PURITY_BINS} bins of neighbour purity (the share of the "
        "input's K neighbours whose label is its true class), clean and attacked sets apart: the defense's "
        "mechanism. An attack that poisons the neighbourhood moves inputs to the left."))

    # Embedded as they are: never a file a link leads to outside the run.
    extra = [inside(run.root, str(p.relative_to(run.root)), "a per-round figure")
             for p in sorted(run.root.glob(f"**/{ROUNDS_GLOB}")) if fig_dir not in p.parents]
    has_aware = any(s.kind == "defense-aware" for s in run.sets)
    if extra:
        parts.append("<h2>Defense-aware attacks, round by round</h2>" + "".join(
            _figure(p.read_bytes(), p.name, html.escape(str(p.relative_to(run.root))))
            for p in extra[:MAX_EMBEDDED_EXTRA]))
    elif has_aware:
        run.missing.append(f"the defense-aware per-round figure ({ROUNDS_GLOB}) is not in the run directory")
    nb = inside(run.root, "neighbours.png", "the neighbours figure")
    if nb.exists():
        parts.append("<h2>Inputs and their nearest neighbours</h2>" + _figure(
            nb.read_bytes(), "neighbours", "Test inputs (left) beside their nearest neighbours in D' "
            "(static-model features); red: another class. What RMC fine-tunes on."))
    else:
        run.missing.append("neighbours.png (drawn at the end of `rmc run`)")
    if old:
        run.missing.append(old)
    run.missing += run.incomplete()
    log(f"  report: {len(series)} curves, {len(drift)} streams, {len(items)} anatomies, {len(groups)} purity groups")
    return "".join(parts)


def _header(run: RunRecords) -> str:
    bases = ", ".join(run.bases) or "none"
    n_sets = sum(s.folder.is_dir() for s in run.sets)
    return (f"<h1>RMC run report</h1><p class='note'>Run directory <code>{html.escape(str(run.root))}</code>; "
            f"data set {html.escape(run.dataset)}; RMC mode {html.escape(run.mode)}; base models {html.escape(bases)}; "
            f"{n_sets} evaluated sets. Written {time.strftime('%Y-%m-%d %H:%M:%S')} from the run's records (the "
            "defense is not re-run).</p>"
            "<p class='note'>Threat models: <b>transfer</b> attacks are crafted against the static model and fed to "
            "RMC (the original paper's setting; it overstates robustness). <b>Defense-aware</b> attacks (FPA, "
            "GMSA-AVG, GMSA-MIN) attack the models RMC adapts into. AutoAttack's own check flags RMC as a dynamic "
            "defense, and RobustBench does not list defenses with an optimisation loop in the forward pass: a "
            "transfer AutoAttack row is not an AutoAttack evaluation of RMC.</p>")


def write_report(run_dir: str | Path, out_dir: str | Path | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """Write report.html and the figures' PNGs for the run at `run_dir` (into `out_dir`, default the run
    directory). Returns the page's path. A directory that is not a run raises RMCError; a partial one gets a
    page that names what is missing."""
    run = RunRecords(run_dir)
    out = Path(out_dir) if out_dir is not None else run.root
    body = build(run, out / FIGURES_DIR, log)
    missing = ""
    if run.missing:
        items = "".join(f"<li>{html.escape(m)}</li>" for m in dict.fromkeys(run.missing))
        missing = f"<div class='missing'><b>Missing or incomplete in this run:</b><ul>{items}</ul></div>"
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>RMC report: "
            f"{html.escape(run.root.name)}</title><style>{CSS}</style></head><body>{_header(run)}{missing}{body}"
            "</body></html>\n")
    path = out / "report.html"
    write_text(path, page)
    return path


__all__ = ["FIGURES_DIR", "table_from_dict", "tables", "write_report"]
