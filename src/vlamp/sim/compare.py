"""Whether two policies differ in success, measured on the same episodes.

Both are run on the same seeded episodes (same tasks, same seeds, so the same object positions),
and each episode gives a pair of outcomes. Pairs where both succeed or both fail say nothing about
the difference; the discordant ones do. The test is McNemar's exact test (a two-sided binomial test
on the discordant pairs); the difference in success rate gets Agresti and Min's (2005) interval for
matched proportions (a Wald interval after adding 1/2 to each of the four cells), which keeps its
coverage at small counts and at 0 or 100%. Pairing removes the episode-to-episode variation the two
policies share, so it needs far fewer episodes than comparing two independent success rates.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from vlamp.precision.errors import VlampError
from vlamp.sim.evaluate import EvalResult

Z95 = 1.959964


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided p-value of McNemar's exact test: the chance of discordant pairs at least this
    lopsided if each were equally likely to favour either policy."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired_difference_interval(both: int, only_a: int, only_b: int, neither: int,
                               z: float = Z95) -> tuple[float, float]:
    """Agresti-Min interval of ``rate_b - rate_a`` from the four cells of the paired table."""
    n11, n10, n01, n00 = (c + 0.5 for c in (both, only_a, only_b, neither))
    n = n11 + n10 + n01 + n00
    d = (n01 - n10) / n
    var = ((n10 + n01) - (n01 - n10) ** 2 / n) / n**2
    half = z * math.sqrt(max(var, 0.0))
    return max(-1.0, d - half), min(1.0, d + half)


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """B against A on the same episodes.

    Attributes:
        episodes: Paired episodes (all tasks).
        both, only_a, only_b, neither: The paired table: episodes both policies solved, only A,
            only B, neither.
        difference: B's success rate minus A's (pooled over the episodes).
        ci95: 95% interval of ``difference`` (Agresti-Min).
        p_value: McNemar's exact test of "no difference".
        per_task: Task -> (only A, only B, episodes).
    """

    episodes: int
    both: int
    only_a: int
    only_b: int
    neither: int
    difference: float
    ci95: tuple[float, float]
    p_value: float
    per_task: dict[str, tuple[int, int, int]]

    @property
    def verdict(self) -> str:
        """``"B better"``, ``"B worse"`` (p < 0.05) or ``"no difference shown"``."""
        if self.p_value < 0.05:
            return "B better" if self.difference > 0 else "B worse"
        return "no difference shown"

    def text(self, a: str = "A", b: str = "B") -> str:
        lo, hi = self.ci95
        lines = [f"paired comparison over {self.episodes} episodes (same tasks, same seeds):",
                 f"  {b} - {a}: {100 * self.difference:+.1f} points, 95% interval "
                 f"[{100 * lo:+.1f}, {100 * hi:+.1f}] (Agresti-Min)",
                 f"  discordant episodes: only {a} {self.only_a}, only {b} {self.only_b}; "
                 f"McNemar exact p = {self.p_value:.3g}: "
                 + ("no difference shown at 5%" if self.p_value >= 0.05 else
                    f"{b} is {'better' if self.difference > 0 else 'worse'} at 5%")]
        moved = {t: c for t, c in self.per_task.items() if c[0] or c[1]}
        if moved:
            lines.append("  per task (only A / only B): " + ", ".join(
                f"{t} {oa}/{ob}" for t, (oa, ob, _) in moved.items()))
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ci95": list(self.ci95), "verdict": self.verdict}


def compare_paired(a: EvalResult, b: EvalResult) -> PairedComparison:
    """Compares two evaluations of the same tasks and episode seeds, episode by episode.

    Raises:
        VlampError: If the two did not run the same tasks with the same number of episodes.
    """
    shape_a = [(t.task, len(t.outcomes)) for t in a.tasks]
    shape_b = [(t.task, len(t.outcomes)) for t in b.tasks]
    if shape_a != shape_b or any(n == 0 for _, n in shape_a):
        raise VlampError(f"paired comparison needs the same tasks and episodes on both sides, got "
                         f"{shape_a} and {shape_b}")
    cells = [0, 0, 0, 0]  # both, only a, only b, neither
    per_task = {}
    for ta, tb in zip(a.tasks, b.tasks):
        oa = ob = 0
        for x, y in zip(ta.outcomes, tb.outcomes):
            cells[0 if x and y else 1 if x else 2 if y else 3] += 1
            oa, ob = oa + (x and not y), ob + (y and not x)
        per_task[ta.task] = (oa, ob, len(ta.outcomes))
    n = sum(cells)
    return PairedComparison(
        episodes=n, both=cells[0], only_a=cells[1], only_b=cells[2], neither=cells[3],
        difference=(cells[2] - cells[1]) / n, ci95=paired_difference_interval(*cells),
        p_value=mcnemar_exact(cells[1], cells[2]), per_task=per_task)
