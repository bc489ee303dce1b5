"""`rmc report`: the figures' data equal what the records and tables say; the page is self-contained; partial,
corrupt and old runs give a page naming what is missing or a one-line error."""

import base64
import io
import json
import math
import shutil
from html.parser import HTMLParser

import matplotlib.image as mpimg
import pytest
import torch

from rmc.artifacts.evalsets import AttackSpec, make_eval_sets, save_eval_sets
from rmc.cli import main as cli
from rmc.cli.commands.run import eps_sweep
from rmc.cli.config import RunConfig, documented_yaml
from rmc.defense import Mode, RMCConfig
from rmc.errors import RMCError
from rmc.evaluation import figure_data as fd
from rmc.evaluation import figures as fg
from rmc.evaluation.common import BaseModel
from rmc.evaluation.driver import evaluate
from rmc.evaluation.html_report import write_report
from rmc.evaluation.report import Table, row_label
from rmc.evaluation.run_records import RunRecords
from rmc.evaluation.stats import Rate
from rmc.io import load_tensors, write_json, write_text
from rmc.models import ModelInfo

K = 32
KEY = "0123abcd"   # a stage key, as rmc.cli.pipeline names stage folders


def _res(root):
    return root / "results" / KEY / "standard"


def _cfg():
    return RMCConfig(k=K, lr=1e-2, max_epochs=2, batch_size=16, calib_k=32, mode=Mode.ONLINE, calib_flip=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_trained, tiny_dprime, digits):
    """A real (small) run directory: evaluation sets at two eps, records from the evaluation driver, the table."""
    root = tmp_path_factory.mktemp("run")
    dprime, feats = tiny_dprime
    info = ModelInfo("small_cnn", 10, (1, 8, 8), sha256="t" * 64, dataset="digits")
    specs = [AttackSpec("clean")] + [AttackSpec("pgd", eps=e, steps=3) for e in (0.1, 0.3)]
    sets = make_eval_sets(tiny_trained, info, digits[1], 8, specs, seed=0)
    save_eval_sets(root / "evalsets" / f"standard-{KEY}", sets)
    cfg = RunConfig()
    cfg.data.dataset, cfg.rmc = "digits", _cfg()
    write_text(root / "config.yaml", documented_yaml(cfg))
    base = BaseModel("standard", tiny_trained, info.sha256, "block3", feats)
    res = evaluate([base], dprime, sets, _cfg(), root / "results" / KEY, 10, progress=False)
    notes = {s.name: "clean" if s.name == "clean" else "transfer" for s in sets}
    stage_dirs = {"standard": {"evalsets": str(root / "evalsets" / f"standard-{KEY}"), "results": str(_res(root))}}
    write_json(root / "results.json", {"table": Table.from_results(res, notes).to_dict(), "stage_dirs": stage_dirs})
    return root


def _copy(run_dir, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_carry_the_report_fields_and_drift_is_the_saved_states_distance(run_dir, tiny_trained):
    folder = _res(run_dir) / "clean"
    recs = _jsonl(folder / "rmc.jsonl")
    for r in recs:
        nb = r["neighbours"]
        assert nb["k"] == K and sum(nb["clean"].values()) + sum(nb["adv"].values()) == K
        assert len(r["adapt_loss"]) == r["adapt_epochs"] and all(v >= 0 for v in r["adapt_loss"])
        assert 0 < r["conf"] <= 1 and 0 <= r["p_true"] <= r["conf"] + 1e-9
        assert r["drift"] > 0
    state = load_tensors(folder / "rmc.state.safetensors")
    static = dict(tiny_trained.named_parameters())
    want = math.sqrt(sum(((state[n] - p.detach()) ** 2).sum().item() for n, p in static.items()))
    assert recs[-1]["drift"] == pytest.approx(want, rel=1e-3)   # the last record's drift: the saved state's
    static_recs = json.loads((folder / "baselines.json").read_text())["undefended"]
    assert all(0 < r["conf"] <= 1 for r in static_recs)


def test_curve_points_equal_the_tables_accuracies(run_dir):
    run = RunRecords(run_dir)
    table = run.results["table"]["rows"]
    series = fd.curve_data(run)
    assert {s.defense for s in series} == {"undefended", "deepnn", "webnn", "rmc"}
    for s in series:
        assert [p.eps for p in s.points] == [0.0, 0.1, 0.3]
        for p in s.points:
            cell = table[row_label(s.base, s.defense)][p.set_name]["accuracy"]
            assert (p.rate.hits, p.rate.n) == (cell["hits"], cell["n"])
    fig = fg.draw_curve(series)
    lines = {ln.get_gid(): ln for ax in fig.axes for ln in ax.get_lines()}
    for s in series:   # what is drawn is the data
        assert list(lines[s.label].get_ydata()) == [100 * p.rate.value for p in s.points]
        assert lines[s.label].get_linestyle() == "-"


def test_curve_panels_name_each_base_and_its_rows_as_the_table_does():
    """A robust base's static curve is its table row ("Adv. trained"), not "None", and its panel is titled by it."""
    point = [fd.CurvePoint(0.0, Rate(8, 10), "clean"), fd.CurvePoint(0.1, Rate(6, 10), "pgd")]
    series = [fd.CurveSeries(base, defense, "PGD-10", "transfer", False, point)
              for base in ("standard", "adversarial") for defense in ("undefended", "rmc")]
    fig = fg.draw_curve(series)
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes]
    assert legends == [["None, PGD-10 [transfer]", "RMC, PGD-10 [transfer]"],
                       ["Adv. trained, PGD-10 [transfer]", "Adv. trained + RMC, PGD-10 [transfer]"]]
    assert [ax.get_title() for ax in fig.axes] == ["Standard base model, untargeted attacks",
                                                   "Adv. trained base model, untargeted attacks"]


def test_older_layout_and_other_configurations_are_read(run_dir, tmp_path):
    """Runs made before stage keys (results/<base>/, evalsets/<base>/) give the same curve; a second configuration's
    results beside the latest are named, not mixed in."""
    root = _copy(run_dir, tmp_path)
    want = [(s.label, [(p.eps, p.rate.hits, p.rate.n) for p in s.points]) for s in fd.curve_data(RunRecords(root))]
    shutil.copytree(_res(root), root / "results" / "89abcdef" / "standard")
    assert "other configuration" in " ".join(RunRecords(root).missing)
    shutil.rmtree(root / "results" / "89abcdef")
    (root / "results" / KEY / "standard").rename(root / "results" / "standard")
    (root / "evalsets" / f"standard-{KEY}").rename(root / "evalsets" / "standard")
    (root / "results" / KEY).rmdir()
    (root / "results.json").unlink()
    got = [(s.label, [(p.eps, p.rate.hits, p.rate.n) for p in s.points]) for s in fd.curve_data(RunRecords(root))]
    assert got == want and len(want) == 4


def test_drift_series_equal_the_records(run_dir):
    run = RunRecords(run_dir)
    series = fd.drift_data(run)
    assert len(series) == 3
    fig = fg.draw_drift(series)
    _, bottom = fig.axes
    for s in series:
        recs = _jsonl(_res(run_dir) / s.set_name / "rmc.jsonl")
        assert s.drift == [r["drift"] for r in recs]
        hits = [r["pred"] == r["label"] for r in recs]
        assert s.running_accuracy == [sum(hits[:i + 1]) / (i + 1) for i in range(len(hits))]
        drawn = next(ln for ln in bottom.get_lines() if ln.get_gid() == f"standard/{s.set_name}")
        assert list(drawn.get_ydata()) == s.drift


def test_purity_bins_count_every_record_by_its_true_label_share(run_dir):
    run = RunRecords(run_dir)
    groups = {g.group: g for g in fd.purity_data(run)}
    assert set(groups) == {"clean", "transfer"}
    for group, names in (("clean", ["clean"]), ("transfer", ["pgd3-eps0.1", "pgd3-eps0.3"])):
        recs = [r for n in names for r in _jsonl(_res(run_dir) / n / "rmc.jsonl")]
        want = [[0, 0] for _ in range(fd.PURITY_BINS)]
        for r in recs:
            y = str(r["label"])
            p = (r["neighbours"]["clean"].get(y, 0) + r["neighbours"]["adv"].get(y, 0)) / K
            b = min(int(p * fd.PURITY_BINS), fd.PURITY_BINS - 1)
            want[b][0] += r["pred"] == r["label"]
            want[b][1] += 1
        assert [[r.hits, r.n] for r in groups[group].rates] == want


def test_anatomy_shows_right_and_wrong_inputs_with_their_records(run_dir):
    run = RunRecords(run_dir)
    items = fd.anatomy_data(run)
    assert items and all(a.set_name in ("clean", "pgd3-eps0.1") for a in items)
    for a in items:
        rec = next(r for r in _jsonl(_res(run_dir) / a.set_name / "rmc.jsonl")
                   if r["index"] == a.index)
        assert (a.rmc_pred, a.correct, a.adapt_loss, a.neighbours) == (rec["pred"], rec["pred"] == rec["label"],
                                                                      rec["adapt_loss"], rec["neighbours"])
        clean, adv = fg.histogram_arrays(a, 10)
        assert clean.sum() + adv.sum() == pytest.approx(1.0)
    for name in ("clean", "pgd3-eps0.1"):
        mine = [a for a in items if a.set_name == name]
        assert sum(a.correct for a in mine) <= fd.ANATOMY_PER_KIND >= sum(not a.correct for a in mine)
    s = next(s for s in run.sets if s.name == items[0].set_name)
    assert run.images(s, [items[0].index]).shape == (1, 1, 8, 8)


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tags, self.links = [], set(), []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        self.links += [v for k, v in attrs if k in ("href", "src") and v and not v.startswith("data:")]


def _parse(path):
    page = _Page()
    page.feed(path.read_text())
    return page


def test_page_is_self_contained_and_every_image_decodes(run_dir, tmp_path):
    path = write_report(run_dir, tmp_path / "out", log=lambda m: None)
    page = _parse(path)
    assert "script" not in page.tags and page.links == []   # no JavaScript, nothing fetched
    assert len(page.imgs) >= 4
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,")
        img = mpimg.imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png")
        assert img.shape[0] > 100 and img.shape[1] > 100
    for name in ("robustness", "drift", "anatomy", "purity"):
        assert (tmp_path / "out" / "figures" / f"{name}.png").stat().st_size > 1000
    text = path.read_text()
    assert "Missing or incomplete" in text and "neighbours.png" in text   # this run has no neighbour grid
    assert "defense-aware" in text and "AutoAttack" in text             # threat models and the caveat


def test_rounds_figure_is_embedded_when_present(run_dir, tmp_path):
    root = _copy(run_dir, tmp_path)
    shutil.copy(_any_png(tmp_path), root / "gmsa-rounds.png")
    text = write_report(root, log=lambda m: None).read_text()
    assert "round by round" in text and "gmsa-rounds.png" in text
    assert (root / "report.html").exists()


def _any_png(tmp_path):
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(2, 2))
    p = tmp_path / "any.png"
    fg.save_png(fig, p)
    return p


def test_partial_run_gets_a_page_naming_what_is_missing(run_dir, tmp_path):
    root = _copy(run_dir, tmp_path)
    (root / "results.json").unlink()
    shutil.rmtree(_res(root) / "pgd3-eps0.3")
    stream = _res(root) / "pgd3-eps0.1" / "rmc.jsonl"
    lines = stream.read_text().splitlines()
    stream.write_text("\n".join(lines[:3] + ["{torn"] + lines[4:]) + "\n")
    path = write_report(root, log=lambda m: None)
    text = path.read_text()
    assert "results.json" in text and "pgd3-eps0.3" in text and "line 4 is corrupt" in text
    run = RunRecords(root)
    assert len(list(run.rmc(next(s for s in run.sets if s.name == "pgd3-eps0.1")))) == 3
    assert "RMC" in text and "rebuilt from the per-input records" in text.lower()


def test_old_records_without_the_new_fields_are_named_not_fatal(run_dir, tmp_path):
    root = _copy(run_dir, tmp_path)
    for stream in (root / "results").rglob("rmc.jsonl"):
        recs = [{k: v for k, v in r.items() if k not in ("neighbours", "drift", "adapt_loss", "conf", "p_true")}
                for r in _jsonl(stream)]
        stream.write_text("".join(json.dumps(r) + "\n" for r in recs))
    run = RunRecords(root)
    assert fd.anatomy_data(run) == [] and fd.purity_data(run) == []
    assert not any(s.has_drift for s in fd.drift_data(run))
    assert "predate" in write_report(root, log=lambda m: None).read_text()


def test_not_a_run_directory_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(RMCError):
        RunRecords(tmp_path / "nope")
    assert cli(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def test_corrupt_results_json_is_named_and_the_table_rebuilt(run_dir, tmp_path):
    root = _copy(run_dir, tmp_path)
    (root / "results.json").write_text("{not json")
    text = write_report(root, log=lambda m: None).read_text()
    assert "results.json" in text and "unreadable" in text and "pgd3-eps0.1" in text


def test_eps_sweep_replaces_the_pgd_eps_values():
    assert eps_sweep([[10, 0.1], [10, 0.2]], ["0.2", "1/20", "0.1"]) == [[10, 0.05], [10, 0.1], [10, 0.2]]
    assert eps_sweep([], ["0.1"]) == [[10, 0.1]]
    with pytest.raises(RMCError):
        eps_sweep([[10, 0.1]], ["2"])


def test_defense_aware_sets_are_dashed_rmc_only(run_dir, tmp_path):
    """An attack-row set (as rmc.evaluation.attack_rows writes it) joins the curve as a dashed RMC series."""
    root = _copy(run_dir, tmp_path)
    src = _res(root) / "pgd3-eps0.1"
    dst = _res(root) / "gmsa-min-r2-margin-pgd40-eps0.1"
    shutil.copytree(src, dst)
    write_json(_res(root) / "attack-sets" / "index.json",
               {"format": "rmc-evalsets/1", "sets": [{"name": dst.name, "file": "x.safetensors", "n": 8,
                                                      "sha256": "0" * 64,
                                                      "attack": {"kind": "gmsa-min", "eps": 0.1, "rounds": 2,
                                                                 "n": 8, "targeted": False}}]})
    run = RunRecords(root)
    aware = [s for s in fd.curve_data(run) if s.threat == "defense-aware"]
    assert [(s.defense, [p.eps for p in s.points]) for s in aware] == [("rmc", [0.0, 0.1])]
    fig = fg.draw_curve(fd.curve_data(run))
    line = next(ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid() == aware[0].label)
    assert line.get_linestyle() == "--"
    assert torch.is_tensor(run.images(run.sets[0], [0]))


def _browser():
    """Playwright and a Chromium (Debian's chromium-headless-shell or chromium), or None where either is missing."""
    try:
        from playwright import sync_api
    except ImportError:
        return None, None
    return sync_api, shutil.which("chromium-headless-shell") or shutil.which("chromium")


def test_every_figure_renders_in_a_headless_browser_offline(run_dir, tmp_path):
    sync_api, exe = _browser()
    if sync_api is None or exe is None:
        pytest.skip("needs `pip install playwright` and a Chromium (apt-get install chromium-headless-shell)")
    page_path = write_report(run_dir, tmp_path, log=lambda m: None)
    requests = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("request", lambda r: requests.append(r.url))
        page.goto(page_path.as_uri())
        page.wait_for_load_state("load")
        images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, "
                               "i.getBoundingClientRect().width])")
        browser.close()
    assert len(images) >= 4
    for alt, complete, natural, shown in images:
        assert complete and natural > 100 and shown > 100, alt
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []   # nothing from the network


def test_stage_folders_follow_results_json_else_the_newest(tmp_path):
    """One lookup for the report and the studies: the folders results.json names (re-rooted: the run moved), else,
    for a run still going, the newest of each kind."""
    import os

    from rmc.evaluation.run_records import stage_folders
    run = tmp_path / "run"
    for i, key in enumerate(("aaaa1111", "bbbb2222")):
        (run / "models").mkdir(parents=True, exist_ok=True)
        (run / "models" / f"standard-{key}.safetensors").write_text("")
        (run / "results" / key / "standard").mkdir(parents=True)
        for p in (run / "models" / f"standard-{key}.safetensors", run / "results" / key / "standard"):
            os.utime(p, (1000 + i, 1000 + i))
    assert stage_folders(run)["results"] == run / "results" / "bbbb2222" / "standard"
    assert stage_folders(run)["model"] == run / "models" / "standard-bbbb2222.safetensors"
    elsewhere = "/old/place/run"
    (run / "results.json").write_text(json.dumps({"stage_dirs": {"standard": {
        "results": f"{elsewhere}/results/aaaa1111/standard",
        "model": f"{elsewhere}/models/standard-aaaa1111.safetensors"}}}))
    found = stage_folders(run)
    assert found["results"] == run / "results" / "aaaa1111" / "standard"
    assert found["model"] == run / "models" / "standard-aaaa1111.safetensors"
    with pytest.raises(RMCError, match="no stage of base model 'adversarial'"):
        stage_folders(run, "adversarial")
