"""DENT, defensive entropy minimisation (Wang, Ju, Shelhamer, Wagner & Darrell 2021, "Fighting Gradients with
Gradients: Dynamic Defenses against Adversarial Attacks"; code DequanWang/dent), as a `rmc.interface.Defense`.

Per test batch, from the static weights every time (episodic per batch, Adaptation.BATCH):
1. every batch-norm layer gets affine parameters of its own *per input* (its scale and shift repeated N times:
   "sample-aware" modulation), normalising with the training running statistics (the released code's default,
   SampleAwareStaticBatchNorm2d) or with the test batch's (`stats: batch`, its SampleAwareOnlineBatchNorm2d);
2. `steps` AdaMod updates of those parameters alone minimise the loss on the batch's predictions: the entropy
   plus the diversity term of the released CIFAR-10 configuration (`loss: entropy-diversity`; its `shot`), or the
   entropy alone (`loss: entropy`; its `tent`);
3. the adapted network predicts the batch.
Everything else stays frozen in inference mode (the released code switches the network to training mode, which
changes nothing for a network whose only batch-dependent layers are the replaced batch norms; kept in
inference mode, dropout stays off and DENT stays deterministic).

AdaMod (Ding, Ren, Luo & Sun 2019, "An Adaptive and Momental Bound Method for Stochastic Learning") is Adam whose
per-parameter step sizes are capped by their own exponential moving average; written out below.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from rmc.checks import check_images, check_positive
from rmc.errors import RMCError
from rmc.interface import Adaptation

LOG_EPS = 1e-5   # inside the logs of the entropy-diversity loss, as the released code (finite at p = 0)


@dataclass
class DentConfig:
    steps: int = 6                   # AdaMod updates per test batch (released CIFAR-10 configuration: 6)
    lr: float = 6e-3                 # AdaMod learning rate (released: 6e-3)
    beta1: float = 0.99              # AdaMod's first-moment decay (released OPTIM.BETA: 0.99)
    beta2: float = 0.999             # its second-moment decay (released: 0.999)
    beta3: float = 0.6               # decay of the moving average that bounds the step sizes (released
                                     # OPTIM.BETA3: 0.6)
    eps: float = 1e-8                # added to the square root of the second moment (AdaMod, Adam)
    weight_decay: float = 0.0        # L2 on the adapted parameters, added to their gradient (released OPTIM.WD: 0)
    batch_size: int = 128            # test inputs adapted together (released TEST.BATCH_SIZE: 128; Chen et al. too)
    loss: str = "entropy-diversity"  # entropy-diversity (released LOSS: shot) | entropy (tent)
    stats: str = "running"           # normalise with the running statistics (released default) | batch (test batch's)

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            check_positive(getattr(self, name), f"dent.{name}", integer=True)
        check_positive(self.lr, "dent.lr")
        check_positive(self.eps, "dent.eps")
        for name in ("beta1", "beta2", "beta3"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise RMCError(f"dent.{name} must be a decay in [0, 1), got {v!r}")
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) \
                or self.weight_decay < 0:
            raise RMCError(f"dent.weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if self.loss not in LOSSES:
            raise RMCError(f"dent.loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.stats not in ("running", "batch"):
            raise RMCError(f"dent.stats must be running or batch, got {self.stats!r}")


# -- the objective ---------------------------------------------------------------------------------------------
def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the batch's predicted distributions."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()


def entropy_diversity(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the predictions plus the negative entropy of their mean: confident predictions that do not
    all fall in one class (the released configuration's loss)."""
    p = logits.softmax(1)
    mean = p.mean(0)
    return -(p * torch.log(p + LOG_EPS)).sum(1).mean() + (mean * torch.log(mean + LOG_EPS)).sum()


LOSSES = {"entropy": entropy, "entropy-diversity": entropy_diversity}


# -- AdaMod ----------------------------------------------------------------------------------------------------
class AdaMod(torch.optim.Optimizer):
    """Per parameter, with g the gradient (+ weight_decay x the parameter) and t the step count:
    m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2,  eta = lr / (sqrt(v / (1 - b2^t)) + eps),
    s = b3 s + (1 - b3) eta (s starts at 0),  p -= min(eta, s) * m / (1 - b1^t)."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), beta3: float = 0.999,
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "beta3": beta3, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad + group["weight_decay"] * p if group["weight_decay"] else p.grad
                state = self.state[p]
                if not state:
                    state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p), s=torch.zeros_like(p))
                state["step"] += 1
                t = state["step"]
                state["m"].mul_(b1).add_(g, alpha=1 - b1)
                state["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                eta = group["lr"] / ((state["v"] / (1 - b2 ** t)).sqrt() + group["eps"])
                state["s"].mul_(group["beta3"]).add_(eta, alpha=1 - group["beta3"])
                p.sub_(torch.minimum(eta, state["s"]) * state["m"] / (1 - b1 ** t))
        return


# -- sample-aware batch norm -----------------------------------------------------------------------------------
class SampleNorm(nn.Module):
    """A frozen nn.BatchNorm2d whose scale and shift may hold one row per input (N x C) instead of one (C)."""

    def __init__(self, bn: nn.BatchNorm2d, batch_stats: bool):
        super().__init__()
        if bn.weight is None or bn.bias is None or bn.running_mean is None or bn.running_var is None:
            raise RMCError("DENT adapts batch-norm scale and shift with running statistics; this model has a "
                           "batch norm without them (affine=False or track_running_stats=False)")
        self.weight = nn.Parameter(bn.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(bn.bias.detach().clone(), requires_grad=False)
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        self.eps, self.batch_stats = bn.eps, batch_stats
        self.running_mean: torch.Tensor
        self.running_var: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_stats:
            mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        else:
            mean, var = self.running_mean, self.running_var
        scale = self.weight * (var + self.eps).rsqrt()
        shift = self.bias - mean * scale
        if scale.dim() == 1:
            scale, shift = scale[None], shift[None]
        elif len(scale) != len(x):
            raise RMCError(f"DENT's parameters were adapted for {len(scale)} inputs, not these {len(x)}")
        return x * scale[:, :, None, None] + shift[:, :, None, None]


def _sample_norms(module: nn.Module, batch_stats: bool) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, SampleNorm(child, batch_stats))
        else:
            _sample_norms(child, batch_stats)
    return module


# -- the defense -----------------------------------------------------------------------------------------------
@dataclass
class DentState:
    """DENT's adapted parameters (per input, N x C, or the static C): evaluated with
    torch.func.functional_call on `Dent.model`, which holds everything else."""
    weights: dict[str, torch.Tensor]
    batches_done: int = 0


@dataclass
class DentTrial:
    logits: torch.Tensor                  # N x classes of the adapted network on the batch
    adapted: DentState | None             # the adapted parameters, if kept
    adapt_epochs: int                     # AdaMod steps taken
    adapt_losses: list[float] = field(default_factory=list)   # the loss before each step


class Dent:
    """DENT around a static model: `trial(x)` adapts to the batch `x` (N x C x H x W in [0, 1]) and predicts it."""
    adaptation = Adaptation.BATCH

    def __init__(self, model: nn.Module, config: DentConfig):
        self.cfg = config
        self.model = _sample_norms(copy.deepcopy(model), config.stats == "batch").eval().requires_grad_(False)
        self.norms = {name: m for name, m in self.model.named_modules() if isinstance(m, SampleNorm)}
        if not self.norms:
            raise RMCError("DENT adapts batch-norm layers and this model has none (nn.BatchNorm2d); choose another "
                           "defense for it")
        self.static = self._params()
        self.batches_done = 0
        self.loss = LOSSES[config.loss]

    def _params(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{p}": getattr(m, p).detach().clone() for name, m in self.norms.items()
                for p in ("weight", "bias")}

    def _load(self, params: dict[str, torch.Tensor], trainable: bool = False) -> list[nn.Parameter]:
        out = []
        for name, m in self.norms.items():
            for p in ("weight", "bias"):
                setattr(m, p, nn.Parameter(params[f"{name}.{p}"].detach().clone(), requires_grad=trainable))
                out.append(getattr(m, p))
        return out

    def reset(self) -> None:
        """Back to the static scale and shift."""
        self._load(self.static)

    def snapshot(self) -> DentState:
        return DentState(self._params(), self.batches_done)

    def restore(self, snap: DentState) -> None:
        self._load(snap.weights)
        self.batches_done = snap.batches_done

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Nothing carries from one batch to the next: every batch starts from the static weights."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise RMCError(f"DENT keeps no state between batches, but was given {len(state)} tensors to resume")

    def trial(self, x: torch.Tensor, features=None, key=None, rows=None, keep: bool = False) -> DentTrial:
        """Adapt to the batch `x` from the static weights and predict it (features, key, rows: unused, DENT is
        deterministic and searches nothing). The adapted parameters stay in `model` until `reset` / `restore`."""
        x = check_images(x, "DENT's test batch")
        if len(x) == 0:
            raise RMCError("DENT got an empty batch; give it one or more images")
        n = len(x)
        params = self._load({k: v.unsqueeze(0).repeat(n, 1) for k, v in self.static.items()}, trainable=True)
        opt = AdaMod(params, self.cfg.lr, (self.cfg.beta1, self.cfg.beta2), self.cfg.beta3, self.cfg.eps,
                     self.cfg.weight_decay)
        losses = []
        with torch.enable_grad():
            for _ in range(self.cfg.steps):
                loss = self.loss(self.model(x))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        for p in params:
            p.requires_grad_(False)
        with torch.no_grad():
            logits = self.model(x)
        if not torch.isfinite(logits).all():
            raise RMCError("DENT's adaptation diverged (non-finite logits); lower dent.lr")
        return DentTrial(logits, self.snapshot() if keep else None, self.cfg.steps, losses)

    def commit(self, trial: DentTrial) -> int:
        """The batch counts; DENT then returns to the static weights (nothing to calibrate: returns 0)."""
        self.reset()
        self.batches_done += 1
        return 0


def build(context) -> Dent:
    """DENT for one base model (rmc.defense.registry.BuildContext: the model and the `dent` settings)."""
    return Dent(context.model, context.settings)


__all__ = ["AdaMod", "Dent", "DentConfig", "DentState", "DentTrial", "SampleNorm", "build", "entropy",
           "entropy_diversity"]
