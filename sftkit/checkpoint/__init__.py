"""Checkpoints: `layout` (every path, the atomic save, manifest, retention, resume
discovery), `checkpointer` (the registry of stateful parts and the `Checkpointer`), `state`
(train counters, RNG, the non-finite guard), `weights` (model and optimizer tensors, one
process or DCP shards), `outputs` (atomic final_hf/ and exports), `safe_load` (no checkpoint
pickle runs) and `export`.

Imports: config, data, dist, log, model -> checkpoint -> train, eval.
"""
