"""One defense-aware row's attack as a resumable stream: the attacker's RMC (online or episodic, from the static
weights), the chosen inputs so far, and one record per attacked input (`attack.jsonl`: the attack's own verdict;
+ the attacker's online state), so a stopped run resumes from the last finished input. The key of input i is
(row name, i), the key the row's scored pass gives it: `strong` uses it, `chen2022` derives its own from it.
rmc.evaluation.attack_rows steps every row's stream input by input, in turn, so a run cut short has attacked the
same first inputs in every row."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from rmc.attacks.defense_aware import AttackRowsConfig, attack_input
from rmc.checks import check_images
from rmc.defense import build_rmc
from rmc.defense.config import Mode, RMCConfig
from rmc.defense.dprime import DPrime
from rmc.errors import RMCError
from rmc.evaluation.common import BaseModel, NeighbourSearch, digest
from rmc.evaluation.records import RecordStream, check_state, state_count

# Settings that do not change a defense-aware row's attack (so changing them keeps its records).
_NOT_IN_FINGERPRINT = ("attacks", "protocols", "autoattack", "transfer_pgd", "n", "rand_n", "rand_eot", "rand_steps")


class AwareStream:
    def __init__(self, kind: str, protocol: str, set_name: str, base: BaseModel, dprime: DPrime,
                 search: NeighbourSearch, x: torch.Tensor, y: torch.Tensor, cfg: RMCConfig, acfg: AttackRowsConfig,
                 folder: Path, source: str):
        self.kind, self.protocol, self.set_name, self.base = kind, protocol, set_name, base
        self.x, self.y, self.cfg, self.acfg = x, y, cfg, acfg
        settings = {k: v for k, v in asdict(acfg).items() if k not in _NOT_IN_FINGERPRINT}
        # Not N: input i depends only on inputs before it, so a run with a smaller N reuses the first N records.
        # With which RMC the attacker ran (its own copy under its own keys, or the scored stream): records made
        # under the other arrangement are refused, not mixed in. An IVF index's settings decide the neighbours.
        approximate = base.search_settings()
        fp = digest(base.sha256, base.layer, asdict(cfg), settings, kind, protocol, acfg.lane(protocol).attacker_rmc,
                    source, len(dprime), dprime.fingerprint, *([approximate] if approximate else []))
        self.rmc = build_rmc(base.model, dprime, search.all, cfg, base.layer)
        self.stream = RecordStream(folder, "attack", fp)
        self.adv = x.clone()
        state = self.stream.load_state()
        if state is not None:
            where = self.stream.state_path
            done = state.pop("__adv__", None)
            steps = state_count(state, "__steps_done__", where)
            if done is None or done.dtype != x.dtype or tuple(done.shape[1:]) != tuple(x.shape[1:]) \
                    or len(done) < len(self.stream):
                raise RMCError(f"{where} lacks the attacked inputs of its records (__adv__); it is damaged: delete "
                               "it and the records beside it to recompute them")
            done = done[:len(x)]
            self.adv[:len(done)] = check_images(done, f"the attacked inputs in {where}")
            self.rmc.steps_done = steps
            if cfg.mode is Mode.ONLINE:
                self.rmc.load_state_dict(check_state(state, self.rmc, str(where)))
        self.stream.rewrite()

    @property
    def done(self) -> int:
        return min(len(self.stream), len(self.x))

    @property
    def records(self) -> list[dict]:
        return self.stream.records[:len(self.x)]

    def step(self) -> dict:
        """Attack the next input; RMC then processes what it receives. Returns (and saves) its record."""
        i = self.done
        res = attack_input(self.rmc, self.base.model, self.base.layer, self.x[i:i + 1], int(self.y[i]), self.kind,
                           self.acfg, key=(self.set_name, i), protocol=self.protocol)
        self.adv[i] = res.x_adv[0]
        rec = {"index": i, "label": int(self.y[i]), "pred": res.prediction, **res.record()}
        saved = {"__adv__": self.adv[:i + 1].clone(), "__steps_done__": torch.tensor(self.rmc.steps_done)}
        if self.cfg.mode is Mode.ONLINE:
            saved.update(self.rmc.state_dict())
        self.stream.append(rec, saved)
        return rec
