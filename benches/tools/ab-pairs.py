#!/usr/bin/env python3
"""Pair ratios of an A/B run made with benches/tools/ab-serve.sh.

    benches/tools/ab-pairs.py WORKLOAD NEW_BUILD OUTPUT LOG [OUTPUT LOG ...]

OUTPUT is the peers harness's output, LOG the AB_LOG of that run (a first line `skip`, written
before the run to make build B serve first, is ignored). Timed runs are paired in run order
(1st with 2nd, 3rd with 4th, ...): the two runs of a pair are seconds apart, so drift of the
machine cancels in their ratio. Prints NEW_BUILD's median and range against the other's, and
the median and geometric mean of the per-pair ratios new/old, each with a 95% bootstrap
confidence interval (10,000 resamples of the pairs, fixed seed): the interval, not one run,
says whether a difference as small as 2% is there.
"""
import math
import random
import re
import statistics
import sys


def main():
    if len(sys.argv) < 5 or len(sys.argv) % 2 == 0:
        sys.exit(__doc__)
    workload, new = sys.argv[1], sys.argv[2]
    pairs, nv, ov = [], [], []
    # Timed runs only (`[STORAGE rep N]`), not the counting run that follows them.
    row = re.compile(r" rep \d+\] " + re.escape(workload) + r"\s+fvd\s+([\d.]+)")
    for out, log in zip(sys.argv[3::2], sys.argv[4::2]):
        vals = [float(m[1]) for m in row.finditer(open(out).read())]
        bins = [line.strip() for line in open(log) if line.strip() != "skip"]
        if len(bins) < len(vals):
            sys.exit(f"{log}: {len(bins)} builds logged for {len(vals)} timed runs")
        for i in range(0, len(vals) - 1, 2):
            (a, ba), (b, bb) = (vals[i], bins[i]), (vals[i + 1], bins[i + 1])
            if ba == bb or new not in (ba, bb):
                sys.exit(f"{log}: runs {i} and {i + 1} are not one of each build")
            n, o = (a, b) if ba == new else (b, a)
            pairs.append(n / o)
            nv.append(n)
            ov.append(o)
    rng = random.Random(1)

    def ci(f):
        r = sorted(f([rng.choice(pairs) for _ in pairs]) for _ in range(10000))
        return f"{r[250]:.3f}-{r[9750]:.3f}"

    def gmean(p):
        return math.exp(sum(map(math.log, p)) / len(p))

    med = statistics.median
    print(f"{len(pairs)} pairs; new median {med(nv):.0f} ({min(nv):.0f}-{max(nv):.0f}), "
          f"old median {med(ov):.0f} ({min(ov):.0f}-{max(ov):.0f}); medians new/old {med(nv) / med(ov):.3f}")
    print(f"pair ratios new/old: median {med(pairs):.3f} (95% CI {ci(med)}), geometric mean "
          f"{gmean(pairs):.3f} (95% CI {ci(gmean)}); new faster in {sum(p > 1 for p in pairs)} of "
          f"{len(pairs)}; range {min(pairs):.3f}-{max(pairs):.3f}")


if __name__ == "__main__":
    main()
