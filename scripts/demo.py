"""`make demo`: the main job on CPU (uses CUDA when present).

1. Token-level divergences: a tiny student fitted to a fixed teacher distribution with each divergence.
2. Tiny GPTs: the trained teacher and student on a few held-out prompts, with their ROUGE-L.
3. The distilled students of the MGSR grid (KD, DistiLLM, MGSR), when committed.
"""

import sys
import time


def main() -> int:
    import demo_distill  # the sibling scripts: this file's folder is sys.path[0]
    import demo_divergences
    import demo_tiny

    parts = [
        ("1. Token-level divergences", demo_divergences.main),
        ("2. Tiny GPT teacher vs student", demo_tiny.main),
        ("3. Distilled students (KD, DistiLLM, MGSR)", demo_distill.main),
        ("4. MQAR recall: full vs sliding window vs SWA + MATCH", __import__("demo_match").main),
    ]
    for title, fn in parts:
        print(f"\n=== {title} ===", flush=True)
        t0 = time.perf_counter()
        fn()
        print(f"({time.perf_counter() - t0:.1f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
