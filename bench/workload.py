"""The benchmark's model and its training-like update stream.

    python bench/workload.py [--size 1.0] [--seed 0]       # describe the model and one simulated minute

The model (``--size 1`` is ~1 GiB) is a recommendation model: five float32
embedding tables of 64-dim rows (256 bytes a row) holding 1 GiB between
them, scaled by ``size``, plus ~3.3 MB of dense MLP layers that do not scale.

The stream is what a training job commits: each simulated minute is
``steps_per_minute`` optimizer steps; each step draws a batch of rows per
table with Zipf(s)-skewed popularity (s = 1.05, hot rows scattered over the
table as real ids are), moves them by a small SGD step, and moves every row
of the dense layers. The batch size is calibrated so that a minute touches
``touch`` (1 %) of each table's rows: hot rows recur in most steps, so the
steps commit more rows between them than a minute leaves changed.
(The Zipf draw is the one of samples/update_stream.py, with the CDF built
once per table so a draw costs O(batch log rows).)
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np

DIM = 64
# name -> share of the 1 GiB of embeddings (rows = share * 2**30 / 256 bytes)
TABLES = {
    "item_emb": 0.5,
    "user_emb": 0.25,
    "ad_emb": 0.125,
    "query_emb": 0.0625,
    "context_emb": 0.0625,
}
EMB_BYTES = 1 << 30
HIDDEN = (1024, 512)
LR = 0.01
PROBE_TENSOR = "context_emb"  # the latency probe writes its last row, which the stream never draws


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dense: bool  # every row changes at every step

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def row_bytes(self) -> int:
        return 4 * math.prod(self.shape[1:])

    @property
    def nbytes(self) -> int:
        return 4 * math.prod(self.shape)


def model_spec(size: float = 1.0) -> list[TensorSpec]:
    """The tensors of the model at ``size`` (1.0: 1 GiB of embeddings + ~3.3 MB dense)."""
    if size <= 0:
        raise ValueError("--size must be positive")
    specs = []
    for name, share in TABLES.items():
        rows = max(1024, int(share * EMB_BYTES * size) // (4 * DIM))
        specs.append(TensorSpec(name, (rows, DIM), dense=False))
    width = DIM * len(TABLES)
    for i, out in enumerate((*HIDDEN, 1)):
        specs.append(TensorSpec(f"mlp.{i}.weight", (out, width), dense=True))
        specs.append(TensorSpec(f"mlp.{i}.bias", (out,), dense=True))
        width = out
    return specs


def make_model(specs: list[TensorSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """Initial values: embeddings ~U(-0.05, 0.05), dense layers ~N(0, 0.1)."""
    rng = np.random.default_rng(seed)
    model = {}
    for s in specs:
        if s.dense:
            model[s.name] = (rng.standard_normal(s.shape, dtype=np.float32) * np.float32(0.1))
        else:
            a = rng.random(s.shape, dtype=np.float32)
            a -= np.float32(0.5)
            a *= np.float32(0.1)
            model[s.name] = a
    return model


class Zipf:
    """Row draws with P(rank r) ~ r^-s over ``n`` rows; ranks hashed to scattered row ids."""

    def __init__(self, n: int, s: float, exclude_last: bool = False):
        self.n = n
        self.space = n - 1 if exclude_last else n  # the probe row is never drawn
        cdf = np.cumsum(np.arange(1, self.space + 1, dtype=np.float64) ** -s)
        self.cdf = cdf / cdf[-1]

    def draw(self, rng: np.random.Generator, k: int) -> np.ndarray:
        ranks = np.searchsorted(self.cdf, rng.random(k), side="right")
        return (ranks.astype(np.int64) * 2654435761) % self.space  # popularity is not contiguous


class Stream:
    """Training-like sparse updates of a replica, step by step (see the module doc)."""

    def __init__(self, specs: list[TensorSpec], seed: int = 1, zipf: float = 1.05, touch: float = 0.01,
                 steps_per_minute: int = 12):
        self.specs = specs
        self.rng = np.random.default_rng(seed)
        self.steps_per_minute = steps_per_minute
        self.touch = touch
        self.samplers = {s.name: Zipf(s.rows, zipf, exclude_last=s.name == PROBE_TENSOR)
                         for s in specs if not s.dense}
        self.batch = {name: self._calibrate(z) for name, z in self.samplers.items()}
        self.probe_seq = 0

    def _calibrate(self, z: Zipf) -> int:
        """Draws per step such that a minute's draws hit ``touch`` of the rows (unique): bisection."""
        target = max(1, int(self.touch * z.n))
        return max(1, math.ceil(_draws_for_unique(z, target) / self.steps_per_minute))

    def set_rows_per_step(self, rows: int) -> None:
        """Resize the batches so that one step commits about ``rows`` distinct embedding rows.

        The rows are shared between the tables as the calibrated batches
        share them; each table's draw count is then found by bisection on
        the distinct rows one step's draw yields (hot rows repeat within a
        step, so a step draws more than it commits).
        """
        total = sum(self.batch.values())
        for name, z in self.samplers.items():
            want = max(1, round(rows * self.batch[name] / total))
            self.batch[name] = _draws_for_unique(z, want)

    def step(self, current, dense: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """One optimizer step: {name: (rows, new values)}. ``current(name, rows)`` gives the values now.

        ``dense=False`` leaves the dense layers out (a trainer that commits
        them at a slower cadence than its embedding rows)."""
        updates = {}
        for s in self.specs:
            if s.dense:
                if not dense:
                    continue
                rows = np.arange(s.rows)
                old = current(s.name, rows).reshape(s.rows, -1)
                noise = self.rng.standard_normal(old.shape, dtype=np.float32)
                noise *= np.float32(LR * 0.1)
                updates[s.name] = (rows, old - noise)
            else:
                rows = np.unique(self.samplers[s.name].draw(self.rng, self.batch[s.name]))
                old = current(s.name, rows)
                grad = self.rng.standard_normal(old.shape, dtype=np.float32)
                grad *= np.float32(LR)
                updates[s.name] = (rows, old - grad)
        return updates

    def probe_step(self, current, dense: bool = True) -> tuple[int, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """A step that also writes probe value ``seq`` (all of its 64 elements) into the probe row."""
        self.probe_seq += 1
        updates = self.step(current, dense=dense)
        spec = next(s for s in self.specs if s.name == PROBE_TENSOR)
        rows, values = updates[PROBE_TENSOR]
        probe = np.full((1, spec.shape[1]), float(self.probe_seq), dtype=np.float32)
        updates[PROBE_TENSOR] = (np.append(rows, spec.rows - 1), np.concatenate([values, probe]))
        return self.probe_seq, updates


def _draws_for_unique(z: Zipf, target: int) -> int:
    """How many draws of ``z`` yield about ``target`` distinct rows (bisection, fixed seed)."""
    target = max(1, min(int(target), z.space))
    rng = np.random.default_rng(12345)
    unique = lambda k: len(np.unique(z.draw(rng, k)))  # noqa: E731
    lo, hi = target, 2 * target
    while unique(hi) < target and hi < 1000 * target:
        lo, hi = hi, 2 * hi
    for _ in range(12):
        mid = (lo + hi) // 2
        if unique(mid) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= max(1, target // 200):
            break
    return hi


def describe(size: float, seed: int = 1, steps_per_minute: int = 12) -> str:
    specs = model_spec(size)
    stream = Stream(specs, seed=seed, steps_per_minute=steps_per_minute)
    total = sum(s.nbytes for s in specs)
    lines = [f"model at --size {size}: {total / 2**30:.3f} GiB, {sum(s.rows for s in specs):,} rows"]
    state = {s.name: np.zeros((s.rows, max(1, math.prod(s.shape[1:]))), np.float32) for s in specs}
    touched: dict[str, set] = {s.name: set() for s in specs}
    committed = 0
    for _ in range(steps_per_minute):
        up = stream.step(lambda n, r: state[n][r])
        for name, (rows, _v) in up.items():
            touched[name].update(rows.tolist())
            committed += len(rows)
    for s in specs:
        kind = "dense" if s.dense else f"zipf batch {stream.batch[s.name]:,} draws/step"
        lines.append(f"  {s.name:14s} {str(list(s.shape)):18s} {s.nbytes / 2**20:9.1f} MiB  {kind}; "
                     f"a minute touches {len(touched[s.name]) / s.rows:.2%} of rows")
    lines.append(f"one simulated minute = {steps_per_minute} commits, {committed:,} rows committed")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps-per-minute", type=int, default=12)
    args = parser.parse_args()
    print(describe(args.size, args.seed, args.steps_per_minute))


if __name__ == "__main__":
    main()
