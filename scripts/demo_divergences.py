"""`make demo`, part 1: a tiny unimodal student fitted to a fixed bimodal teacher with each divergence.

Prints one row per divergence: its final value, the fitted student's forward KL(p||q) and reverse
KL(q||p), its mass near each teacher mode, its centre (units of V) and entropy. Forward KL covers both
modes (mass split, high entropy); reverse KL seeks one (all mass on one mode). See
``fast.divergences.demo_fit`` and notebooks/01_divergences.py.
"""


def main() -> None:
    from fast.divergences import demo_fit, format_demo_table

    print("teacher: 0.6/0.4 mixture of two bumps over V=64 tokens; student: one discretised Gaussian")
    print("(centre, width), Adam 200 steps, torch backend, temperature 1\n")
    print(format_demo_table(demo_fit(V=64, steps=200)))


if __name__ == "__main__":
    main()
