"""fgdist: representation learning with fine-grained patterns, distributed.

The design of the code as it is: docs/DESIGN.md.

Library modules (one job each):
  config      typed run configuration (pydantic), loaded from one JSON file
  objective_table  the five objectives: heads, dense or grouped instance term, loss weights
  shardset    reading a shard set: manifest, Parquet index, validation against the tars
  partition   the column line: which rank owns which instance columns
  data        per-rank WebDataset streams for both routings, augmentation, equal steps
  kernels     grouped logsumexp: PyTorch reference and fused Triton kernel behind one dispatch
  head        the partitioned instance head (a per-rank slice outside DeepSpeed)
  collectives every collective of fgdist, on the communication device: the instance loss,
              cross-rank BatchNorm, evaluation, checkpoints, embed (autograd-aware gathers and sums)
  objectives  base / fine / indi / base_indi / base_indi_eff as one loss module
  backbones   the backbone: ResNet-18, any torchvision or timm model, pretrained weights
  model       the engine-wrapped network (backbone + heads), cross-rank BatchNorm
  trainer     the DeepSpeed training loop
  checkpoint  atomic checkpoints and restart
  evaluation  distributed, chunked Recall@k and super-class top-k
  tracking    MLflow from rank 0
  log         logging with time and rank
  cli         one command-line grammar; run_reporting ends every command's named errors
  harness     a free port, a gloo group, a local HTTP wait: for the launcher, tests and bench
  deepspeed_shm  DeepSpeed's CPU shared-memory op skipped; its leaked /dev/shm buffer's workaround
  start_time  the start line: where a rank's start went, up to its first step
  figures     the shared matplotlib figure helper of comparison and pictures
  export, embed, search, retrieval_metrics
              from a trained run to visual search: model export and load_model, Parquet
              embeddings, faiss index and queries, MAP@R and R-precision
  serve       fgdist-serve: the search over HTTP, and its page (static/index.html)
"""

__version__ = "0.1.0"


def load_model(source):
    """A module mapping images to L2-normalized embeddings (fgdist.export.load_model)."""
    from fgdist.export import load_model as load

    return load(source)
