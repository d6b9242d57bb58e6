"""fgdist: representation learning with fine-grained patterns, distributed.

The design of the code as it is, and a newcomer's tour: docs/DESIGN.md.

Packages, lowest first (LAYERS below: a module imports only from its own package and those below):
  (top level)  the foundation every package uses: config, objective_table, backbones and
               narrow_resnet (what a config may name), collectives (every collective of fgdist:
               the instance loss, cross-rank BatchNorm, evaluation, checkpoints, embed), cli, log,
               output_folder (atomic outputs), images (decode), search_errors (the named errors),
               embeddings_io (the Parquet embeddings format), retrieval_metrics (Recall@k, MAP@R)
  data         shard sets (shardset, remote), the column line (partition), the per-rank streams
               (loader) and augmentation (augment)
  kernels      grouped logsumexp: PyTorch reference and fused Triton kernel behind one dispatch
  training     the model (model, head), the objectives, the DeepSpeed loop (trainer,
               deepspeed_config), checkpoints, evaluation and per-query rows, MLflow tracking,
               the start line (start_time)
  report       comparison of runs, paired differences (bootstrap), figures and pictures
  retrieval    from a trained run to visual search: export and load_model, embed, index and
               search, serve (and its page, static/index.html), publish (the end of a run)
  harness      a free port, a gloo group, a local HTTP wait: for the launcher, tests and bench
"""

from fgdist.cli import __version__

# The allowed import directions, lowest first; tests/unit/test_import_layers.py holds every module
# to it. Top-level modules not named here are the foundation (layer 0); this package's own
# __init__ (load_model) and harness sit above everything.
LAYERS = ("data", "kernels", "training", "report", "retrieval", "harness")

__all__ = ["LAYERS", "__version__", "load_model"]


def load_model(source):
    """A module mapping images to L2-normalized embeddings (fgdist.retrieval.export.load_model)."""
    from fgdist.retrieval.export import load_model as load

    return load(source)
