"""Which causal decision rule can agree with top-k routing? An offline screen on a trained model.

Top-k depth routing looks at the whole sequence; generation must decide token by token. This
benchmark takes a trained run (exported with ``modmoe export``), records at every routed block
the residual stream entering it, the router logits and the top-k membership, on training batches
(to fit) and on the validation batches ``modmoe eval`` uses (to measure), and fits candidate
decision rules offline on the frozen trunk:

- ``router``: the run's own router, sigmoid(r) > 0.5 (what ``causal_router: aux_loss`` does);
- ``predictor``: the run's own stop-gradient predictor MLP, as trained with the trunk;
- ``mlp``: the same predictor shape (D -> hidden -> 1) fitted here, for a like-for-like baseline;
- ``mlp-posw``: the same, with the positive class weighted (1 - c) / c in the BCE;
- ``prefix-rank``: no parameters: enter when r is within the top ``c`` of the router logits the
  sequence has produced so far (its own included), a causal estimate of the per-sequence threshold;
- ``prefix-prior``: the same, counted with ``--prior-tokens`` virtual tokens drawn from the
  population of router logits (the training batches'), which stand in while the prefix is short:
  the rule ``causal_router: prefix_rank`` implements (``modmoe.model.routing.prefix_rank_enter``,
  its prior a running quantile table kept in training);
- ``mlp-prefix``: the MLP with causal features of the router logits appended to x: r, r minus the
  running mean of the prefix, the running std, the prefix rank, and log position.

The decisions each rule makes are compared with top-k membership per routed layer: agreement,
precision and recall of "enters", and entry rate (at capacity 0.125 never entering already agrees
0.875, so precision and recall say more). The trunk is frozen, so this screens rules; the chosen
one must then be trained with the trunk (``modmoe train``) and checked by ``modmoe eval``.

    python benchmarks/causal_predictor.py --run-dir runs/tiny [--fit-batches 32] [--epochs 30]

The last line is machine-readable: ``rule=agreement_min/agreement_mean`` for each rule.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modmoe.data import PreparedData, validation_batches  # noqa: E402
from modmoe.export import export_checkpoint  # noqa: E402
from modmoe.inference.evaluate import load_validation  # noqa: E402
from modmoe.inference.loading import load_exported  # noqa: E402


@dataclass
class LayerStates:
    """What one routed block saw: residual states, router logits, top-k membership."""

    x: torch.Tensor  # (B, T, D)
    logits: torch.Tensor  # (B, T)
    member: torch.Tensor  # (B, T) bool
    predictor: torch.Tensor | None  # (B, T) the run's predictor logits


def record(model, batches) -> dict[int, LayerStates]:
    """Runs top-k forwards and keeps every routed block's inputs and choices."""
    seen: dict[int, list] = {}
    hooks = []
    for i, block in enumerate(model.layers):
        if block.router is None:
            continue

        def hook(mod, args, out, i=i):
            seen.setdefault(i, []).append((args[0].detach(), out.logits.detach(), out.topk_mask, out.predictor_logits))

        hooks.append(block.router.register_forward_hook(hook))
    with torch.no_grad():
        for inputs, _ in batches:
            model(inputs, routing="topk")
    for h in hooks:
        h.remove()
    out = {}
    for i, rows in seen.items():
        pred = None if rows[0][3] is None else torch.cat([r[3] for r in rows])
        out[i] = LayerStates(*(torch.cat([r[j] for r in rows]) for j in range(3)), pred)
    return out


def prefix_features(logits: torch.Tensor, capacity: float) -> torch.Tensor:
    """(B, T) router logits -> (B, T, 5) causal features: r, r - running mean, running std,
    prefix rank (fraction of the prefix at or above r), log position."""
    B, T = logits.shape
    count = torch.arange(1, T + 1, dtype=torch.float32)[None]  # (1, T)
    mean = logits.cumsum(1) / count
    var = (logits.square().cumsum(1) / count - mean.square()).clamp_min(0)
    rank = prefix_rank(logits)
    return torch.stack([logits, logits - mean, var.sqrt(), rank - capacity, count.log().expand(B, T)], -1)


def prefix_rank(logits: torch.Tensor) -> torch.Tensor:
    """(B, T) -> fraction of tokens j <= i with logits[j] >= logits[i] (1/i at the prefix's top)."""
    T = logits.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # (i, j): j <= i
    at_or_above = (logits[:, None, :] >= logits[:, :, None]) & causal  # (B, i, j)
    return at_or_above.sum(-1).float() / torch.arange(1, T + 1, dtype=torch.float32)


class MLP(nn.Module):
    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(inputs, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f).squeeze(-1)


def fit(features: torch.Tensor, member: torch.Tensor, hidden: int, pos_weight: float, epochs: int, seed: int) -> MLP:
    torch.manual_seed(seed)
    model = MLP(features.shape[-1], hidden)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    flat_f, flat_y = features.reshape(-1, features.shape[-1]), member.reshape(-1).float()
    weight = torch.tensor(pos_weight)
    for _ in range(epochs):
        order = torch.randperm(flat_f.shape[0])
        for chunk in order.split(4096):
            loss = F.binary_cross_entropy_with_logits(model(flat_f[chunk]), flat_y[chunk], pos_weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


@dataclass
class Score:
    agreement: float
    precision: float
    recall: float
    entry: float


def score(enter: torch.Tensor, member: torch.Tensor) -> Score:
    tp = (enter & member).sum().item()
    return Score(
        agreement=(enter == member).float().mean().item(),
        precision=tp / max(enter.sum().item(), 1),
        recall=tp / max(member.sum().item(), 1),
        entry=enter.float().mean().item(),
    )


def standardized(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (x - ref.mean((0, 1))) / ref.std((0, 1)).clamp_min(1e-6)


def prefix_with_prior(
    logits: torch.Tensor, population: torch.Tensor, capacity: float, prior_tokens: float
) -> torch.Tensor:
    """(B, T) bool: the prefix rank counted with ``prior_tokens`` virtual tokens from ``population``."""
    ranked = population.flatten().float().sort().values
    share = 1 - torch.searchsorted(ranked, logits.contiguous()).float() / ranked.numel()  # (B, T)
    above = prefix_rank(logits) * torch.arange(1, logits.shape[1] + 1, dtype=torch.float32)
    count = torch.arange(1, logits.shape[1] + 1, dtype=torch.float32)
    return (above + prior_tokens * share) / (count + prior_tokens) <= capacity


RULES = ("router", "predictor", "prefix-rank", "prefix-prior", "mlp", "mlp-posw", "mlp-prefix")


def screen(
    fit_states,
    val_states,
    capacity: float,
    hidden: int,
    epochs: int,
    seed: int,
    prior_tokens: float,
    wanted: tuple[str, ...] = RULES,
) -> dict[str, dict[int, Score]]:
    rules: dict[str, dict[int, Score]] = {}
    posw = (1 - capacity) / capacity
    for layer, val in sorted(val_states.items()):
        train = fit_states[layer]
        rules.setdefault("router", {})[layer] = score(val.logits > 0, val.member)
        if val.predictor is not None:
            rules.setdefault("predictor", {})[layer] = score(val.predictor > 0, val.member)
        rules.setdefault("prefix-rank", {})[layer] = score(prefix_rank(val.logits) <= capacity, val.member)
        enter = prefix_with_prior(val.logits, train.logits, capacity, prior_tokens)
        rules.setdefault("prefix-prior", {})[layer] = score(enter, val.member)
        if not {"mlp", "mlp-posw", "mlp-prefix"} & set(wanted):
            continue
        x_train, x_val = standardized(train.x, train.x), standardized(val.x, train.x)
        for name, pw in (("mlp", 1.0), ("mlp-posw", posw)):
            model = fit(x_train, train.member, hidden, pw, epochs, seed)
            with torch.no_grad():
                rules.setdefault(name, {})[layer] = score(model(x_val) > 0, val.member)
        f_train = torch.cat([x_train, prefix_features(train.logits, capacity)], -1)
        f_val = torch.cat([x_val, prefix_features(val.logits, capacity)], -1)
        model = fit(f_train, train.member, hidden, 1.0, epochs, seed)
        with torch.no_grad():
            rules.setdefault("mlp-prefix", {})[layer] = score(model(f_val) > 0, val.member)
    return {name: layers for name, layers in rules.items() if name in wanted}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, help="a finished modmoe run (exported here unless --export exists)")
    ap.add_argument("--export", default=None, help="export directory (default: RUN_DIR-export)")
    ap.add_argument("--fit-batches", type=int, default=32, help="training batches to fit the rules on")
    ap.add_argument("--hidden", type=int, default=64, help="hidden width of the fitted MLPs")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prior-tokens", type=float, default=32.0, help="weight of the population prior (prefix-prior)")
    ap.add_argument("--rules", default=",".join(RULES), help="comma-separated subset of " + ", ".join(RULES))
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    export = Path(args.export or f"{args.run_dir.rstrip('/')}-export")
    if not (export / "config.json").is_file():
        export_checkpoint(args.run_dir, export, log=lambda _: None)
    loaded = load_exported(export, need_tokenizer=False)
    capacity = loaded.config.depth.capacity
    val_batches = load_validation(loaded)
    data = PreparedData.load(Path(loaded.record["data"]["prepared_dir"]))
    seq_len, batch = val_batches[0][0].shape[1], val_batches[0][0].shape[0]
    fit_batches = validation_batches(data.open("train"), seq_len, batch, args.fit_batches)
    fit_states, val_states = record(loaded.model, fit_batches), record(loaded.model, val_batches)
    wanted = tuple(args.rules.split(","))
    rules = screen(fit_states, val_states, capacity, args.hidden, args.epochs, args.seed, args.prior_tokens, wanted)
    print(
        f"{export}: capacity {capacity}, fit on {args.fit_batches} x {batch} x {seq_len} training tokens, "
        f"measured on {len(val_batches)} x {batch} x {seq_len} validation tokens"
    )
    print("| rule | layer | agreement | precision | recall | entry |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, layers in rules.items():
        for layer, s in layers.items():
            print(f"| {name} | {layer} | {s.agreement:.4f} | {s.precision:.3f} | {s.recall:.3f} | {s.entry:.3f} |")
    summary = []
    for name, layers in rules.items():
        agree = [s.agreement for s in layers.values()]
        summary.append(f"{name}={min(agree):.4f}/{sum(agree) / len(agree):.4f}")
    print(" ".join(summary))
    if not all(math.isfinite(s.agreement) for layers in rules.values() for s in layers.values()):
        raise SystemExit("non-finite score")


if __name__ == "__main__":
    main()
