"""Toy MoE-like model, sampler and training loop shared by the checkpoint tests and workers."""

from __future__ import annotations

import torch
from torch import nn

from modmoe.checkpoint import TrainState

D, F, E = 16, 32, 4


class ToyMoE(nn.Module):
    """Two linear layers, a stacked ``(E, D, F)`` expert parameter and a persistent bias buffer."""

    def __init__(self, d: int = D, f: int = F, e: int = E, dropout: float = 0.1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, f)
        self.fc2 = nn.Linear(f, d)
        self.experts = nn.Parameter(torch.randn(e, d, f) * 0.05)  # (E, D, F)
        self.register_buffer("expert_bias", torch.zeros(e), persistent=True)  # (E,)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, D)
        h = self.drop(torch.relu(self.fc1(x)))  # (B, F)
        scores = x @ self.experts.mean(-1).T + self.expert_bias  # (B, E)
        gate = torch.softmax(scores, dim=-1)  # (B, E)
        ex = torch.einsum("bd,edf->bef", x, self.experts)  # (B, E, F)
        return self.fc2(h + (gate.unsqueeze(-1) * ex).sum(1))  # (B, D)


class ToySampler:
    """Deterministic batches from an index; its state is a small dict of ints."""

    def __init__(self, seed: int = 1234, batch: int = 8) -> None:
        self.seed, self.batch, self.index = seed, batch, 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.index)
        self.index += 1
        x = torch.randn(self.batch, D, generator=g)  # (B, D)
        return x, x.flip(-1)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "index": self.index}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.seed, self.index = sd["seed"], sd["index"]


def build(
    seed: int = 0, lr: float = 1e-2, model_cls: type[ToyMoE] = ToyMoE
) -> tuple[ToyMoE, torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    model = model_cls()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    return model, opt, sched


def train_step(model: nn.Module, opt: torch.optim.Optimizer, sched, sampler: ToySampler) -> float:
    """One step with two random parts (dropout, input noise), so RNG restore matters."""
    x, y = sampler.next()
    x = x + 0.01 * torch.randn_like(x)
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    base = model.module if hasattr(model, "module") else model
    # Aux-loss-free style bias update outside the gradient; identical on every rank (a real
    # MoE all-reduces the expert load first) so the replicated buffer stays replicated.
    g = torch.Generator().manual_seed(sampler.index)
    with torch.no_grad():
        base.expert_bias.add_(0.001 * torch.sign(torch.randn(base.expert_bias.shape, generator=g)))
    return float(loss.detach())


def app_state(model, opt, sched) -> dict[str, TrainState]:
    return {"train": TrainState(model, opt, sched)}


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
