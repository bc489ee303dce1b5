"""studies/reproduction_table.py: the static model and RMC compared on the same inputs while RMC's cells grow."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "reproduction_table", Path(__file__).parents[1] / "studies" / "reproduction_table.py")
table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table)


def test_paired_counts_use_only_the_inputs_rmc_has_done():
    static = [{"index": i, "label": 0, "pred": p} for i, p in enumerate([0, 0, 1, 1, 0])]   # right on 0, 1, 4
    rmc = [{"index": i, "label": 0, "pred": p} for i, p in enumerate([0, 1, 0])]            # right on 0, 2
    results = {"standard": {"clean": {"undefended": static, "rmc": rmc},
                            "pgd10": {"undefended": static}}}                               # no RMC yet: left out
    assert table.paired_counts(results) == [
        "standard clean: static 2 / RMC 2 correct of the same 3 (RMC lost 1, gained 1)"]
