"""MQAR recall of the shipped tiny models: full attention vs sliding window (SWA) vs SWA + MATCH.

Part of `make demo`.

python scripts/demo_match.py

Loads ``tiny_models/checkpoints/match/{full,swa,match}.safetensors`` (no training) and scores them on
fresh MQAR examples (a seed none of them trained or was evaluated on), overall and by key-query distance;
then the full model again with its attention swapped at inference (no retraining) for SWA and SWA + MATCH.
"""

import os

import torch

from tiny_models.match_grid import (  # noqa: E402
    CKPT_DIR,
    DEMO_SEED,
    attended_fraction,
    by_distance,
    evaluate,
    load_run,
    make_batch,
    plugin_eval,
    plugin_variants,
    use_match_chunk,
)

NAMES = ("full", "swa", "match")


def main(n: int = 256) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra OpenMP threads only add synchronisation
    try:
        return _demo(n)
    finally:
        torch.set_num_threads(threads)


def _fmt_bins(bins) -> str:
    return "  ".join(
        f"[{b['lo']},{b['hi'] if b['hi'] < 1 << 20 else 'inf'}):{100 * b['acc']:5.1f}" for b in bins
    )


def _demo(n: int) -> dict:
    use_match_chunk()
    runs = {name: load_run(os.path.join(CKPT_DIR, f"{name}.safetensors")) for name in NAMES}
    cfg0 = runs["full"][1]
    x, y = make_batch(cfg0, n, DEMO_SEED)
    print(
        f"MQAR: T={cfg0.seq_len}, {cfg0.num_kv_pairs} key-value pairs, vocab {cfg0.vocab_size}, "
        f"{n} fresh examples "
        f"(seed {DEMO_SEED}); accuracy over the queried values, then by key-query distance [lo,hi)"
    )
    out = {}
    for name, (model, cfg) in runs.items():
        res = evaluate(model, x, y)
        frac = attended_fraction(cfg.seq_len, cfg.attention, cfg.window, cfg.attn_kwargs)
        kw = ", ".join(f"{k}={v}" for k, v in cfg.attn_kwargs)
        label = f"{cfg.attention}" + (f" w={cfg.window}" if cfg.window else "") + (f" ({kw})" if kw else "")
        print(f"  trained {name:5s} {label:48s} attended {frac:.2f}  acc {100 * res['acc']:5.1f} %")
        print(f"        {_fmt_bins(by_distance(res['correct'], res['dist']))}")
        out[name] = res["acc"]
    w = runs["swa"][1].window
    print(f"The full model with its attention swapped at inference (window {w}, no retraining):")
    for r in plugin_eval(runs["full"][0], x, y, plugin_variants(w, top_ks=(1, 4), block_size=4)):
        if "error" in r:
            print(f"  {r['variant']:48s} unavailable: {r['error']}")
            continue
        print(f"  {r['variant']:48s} attended {r['attended']:.2f}  acc {100 * r['acc']:5.1f} %")
        out["plugin " + r["variant"]] = r["acc"]
    return out


if __name__ == "__main__":
    main()
