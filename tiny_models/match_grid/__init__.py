"""Tiny GPTs on the recall tasks of ``tiny_models/recall.py`` with full, sliding-window and MATCH attention.

Three entry points (functions, and subcommands of ``python -m tiny_models.match_grid``):

* ``train`` -- one run (:func:`train_run`): a 2-layer tiny GPT (``tiny_models/gpt.py``) on fresh, seeded
  batches of one task; AdamW, linear warmup + cosine decay, loss = cross-entropy on labelled positions
  only (the output layer is computed only there); evaluation on a fixed held-out set, early stop at 99 %.
* ``plugin`` -- :func:`plugin_eval`: one trained model evaluated with its attention swapped at inference
  (full -> SWA -> SWA + MATCH at several top-k), no retraining.
* ``grid`` -- :func:`run_grid`: every (attention, seed[, num_kv_pairs]) run of a preset, resumable (one
  directory per run with ``result.json`` and ``model.safetensors``; finished runs are skipped), then
  ``table`` / ``plot`` summarise the directory.

Data per training step ``s`` of a run with seed ``r`` come from ``seed = 1_000_003 * r + s`` (fresh
examples every step, reproducible); the held-out set uses seed ``10**9 + r`` (never a training seed).

One module per part: ``config`` (run and grid configs, task batches), ``model`` (the recall model and its
checkpoints), ``run`` (one training run on ``fast.training``'s loop and schedule, evaluation), ``plugin``
(attention swapped at inference), ``grid`` (the resumable grid), ``reports`` (tables and plots), ``cli``.
"""

from tiny_models.match_grid.config import (  # noqa: F401
    _KV_FIELDS,
    DEMO_SEED,
    TASK_DEFAULTS,
    GridSpec,
    RunConfig,
    heldout,
    make_batch,
    run_name,
    training_config,
)
from tiny_models.match_grid.grid import finished_runs, grid_runs, run_grid  # noqa: F401
from tiny_models.match_grid.model import (  # noqa: F401
    CKPT_DIR,
    MATCH_CHUNK,
    RecallGPT,
    layer_qk,
    load_run,
    logits_at,
    new_model,
    save_run,
    use_match_chunk,
)
from tiny_models.match_grid.plugin import (  # noqa: F401
    attended_fraction,
    attention_cost,
    plugin_eval,
    plugin_pairs,
    plugin_table,
    plugin_variants,
    swapped,
)
from tiny_models.match_grid.reports import (  # noqa: F401
    DIST_BINS,
    by_distance,
    markdown_table,
    plot_grid,
    summarise,
    write_results,
)
from tiny_models.match_grid.run import evaluate, train_run  # noqa: F401
