"""A Ray cluster that does not answer fails in seconds with one line; one that goes away mid-run leaves what finished
on disk, says so in one line, and the same command resumes from there. No cluster is started: the address tests
point at a port where nothing (or no Ray) listens, and a cluster's loss is the error Ray raises, made to happen."""

import contextlib
import json
import socket
import time

import pytest

ray = pytest.importorskip("ray")

from rmc.artifacts.dprime import AugmentConfig, build_dprime_store  # noqa: E402
from rmc.artifacts.evalsets import AttackSpec, make_eval_sets, save_eval_sets  # noqa: E402
from rmc.artifacts.features import ensure_features  # noqa: E402
from rmc.cli import main as cli  # noqa: E402
from rmc.errors import RMCError  # noqa: E402
from rmc.models import ModelInfo, default_layer, save_checkpoint  # noqa: E402
from rmc.scaleout import executors  # noqa: E402
from rmc.scaleout.executors import InlineExecutor, connect, lost  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(autouse=True)
def _no_ray_left():
    yield
    assert not ray.is_initialized()


def test_an_address_where_nothing_listens_fails_at_once_naming_it():
    address = f"127.0.0.1:{_free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(RMCError) as e:
        connect(address, timeout=15)
    assert time.perf_counter() - t0 < 10          # refused at once (importing Ray is most of it)
    message = str(e.value)
    assert address in message and "ray status" in message and "port" in message and "\n" not in message


def test_a_port_that_answers_but_is_no_ray_cluster_fails_within_the_bound():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        address = f"127.0.0.1:{srv.getsockname()[1]}"
        t0 = time.perf_counter()
        with pytest.raises(RMCError, match="did not answer within 4 s") as e:
            connect(address, timeout=4)
        assert time.perf_counter() - t0 < 4 + 3     # the bound, plus starting and ending the probe
        assert address in str(e.value)


def test_the_bound_is_checked():
    with pytest.raises(RMCError, match="--ray-timeout"):
        connect("127.0.0.1:1", timeout=0)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_trained, digits):
    root = tmp_path_factory.mktemp("ws")
    train, test = digits
    info = save_checkpoint(tiny_trained, ModelInfo("small_cnn", 10, (1, 8, 8), dataset="digits"),
                           root / "m.safetensors")
    save_eval_sets(root / "sets", make_eval_sets(tiny_trained, info, test, 6, [AttackSpec("clean")], seed=0))
    store = build_dprime_store(tiny_trained, info, train, root / "dprime",
                               AugmentConfig(steps=(2,), eps=0.1, step_size=0.03, chunk_size=64, batch_size=64,
                                             train_subset=120), progress=False)
    ensure_features(tiny_trained, info, default_layer(tiny_trained), store, root / "feats" / "dprime.npy")
    return root


def _evaluate(ws, out, *extra):
    return ["evaluate", "--model", str(ws / "m.safetensors"), "--store", str(ws / "dprime"), "--evalsets",
            str(ws / "sets"), "--features", str(ws / "feats" / "dprime.npy"), "--n", "6", "--no-attack-rows",
            "--mode", "episodic", "--set", "rmc.k=16", "--set", "rmc.max_epochs=1", "--set", "rmc.fast_path=false",
            "--out", str(out), *extra]


def test_evaluate_with_an_unreachable_cluster_fails_in_one_line_before_any_work(ws, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RMC_CACHE_DIR", str(tmp_path / "cache"))
    address = f"127.0.0.1:{_free_port()}"
    t0 = time.perf_counter()
    assert cli(_evaluate(ws, tmp_path / "out", "--ray", address, "--ray-timeout", "5")) == 2
    assert time.perf_counter() - t0 < 30
    line = _one_line_error(capsys)
    assert address in line and "ray status" in line
    assert not (tmp_path / "out" / "results").exists()


class ClusterGone(InlineExecutor):
    """Runs tasks here, as Ray would on the cluster, until the cluster goes away: from then on every result is the
    error Ray raises for a task it gave up on (its node died)."""
    remote = True
    slots = 2
    where = "a cluster that goes away"

    def __init__(self, results_before: int):
        super().__init__()
        self.left = results_before

    def next(self):
        key, value = super().next()
        if self.left == 0:
            raise lost(ray.exceptions.NodeDiedError("node 1a2b3c died"), key)
        self.left -= 1
        return key, value


def test_a_cluster_that_goes_away_mid_run_keeps_what_finished_and_the_rerun_resumes(ws, tmp_path, capsys,
                                                                                    monkeypatch):
    from rmc.evaluation import driver
    monkeypatch.setenv("RMC_CACHE_DIR", str(tmp_path / "cache"))
    assert cli(_evaluate(ws, tmp_path / "clean")) == 0
    clean = json.loads((tmp_path / "clean" / "results.json").read_text())["table"]["rows"]
    capsys.readouterr()

    monkeypatch.setattr("rmc.cli.commands.evaluate.hold", lambda *a: contextlib.nullcontext(2))
    monkeypatch.setattr(driver, "executor", lambda ray, workers, device=None: contextlib.nullcontext(ClusterGone(2)))
    out = tmp_path / "out"
    assert cli(_evaluate(ws, out, "--ray", "10.0.0.1:6379", "--block", "1")) == 2
    line = _one_line_error(capsys)
    assert "NodeDiedError" in line and "saved" in line and "re-run the same command" in line
    stream = out / "results" / "standard" / "clean" / "rmc.jsonl"
    assert [json.loads(x)["index"] for x in stream.read_text().splitlines()] == [0, 1]   # what finished is kept
    assert not (out / "results.json").exists()

    ran = []
    real = driver.rmc_task
    monkeypatch.setattr(driver, "rmc_task", lambda *a, **k: ran.append(a[2]) or real(*a, **k))
    monkeypatch.setattr(driver, "executor", lambda ray, workers, device=None: contextlib.nullcontext(InlineExecutor()))
    assert cli(_evaluate(ws, out, "--ray", "10.0.0.1:6379")) == 0        # the cluster is back: the same command
    assert sorted(i for pos in ran for i in pos) == [2, 3, 4, 5]         # only what was lost is computed again
    assert json.loads((out / "results.json").read_text())["table"]["rows"] == clean


def test_ray_executor_turns_a_lost_task_into_the_one_line():
    ex = executors.RayExecutor.__new__(executors.RayExecutor)
    ex.ray, ex.refs = ray, {"ref": ("clean", 4)}
    ex.ray = type("FakeRay", (), {"exceptions": ray.exceptions,
                                  "wait": staticmethod(lambda refs, num_returns: (refs[:1], refs[1:])),
                                  "get": staticmethod(lambda ref: (_ for _ in ()).throw(
                                      ray.exceptions.NodeDiedError("node 1a2b died")))})
    with pytest.raises(RMCError, match=r"Ray lost task \('clean', 4\) \(NodeDiedError.*re-run the same command"):
        ex.next()
