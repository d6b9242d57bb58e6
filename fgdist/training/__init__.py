"""Training: the network (model: backbone + heads, cross-rank BatchNorm), the partitioned instance
head (head), the objectives (objectives), the DeepSpeed loop (trainer) and its engine config
(deepspeed_config), checkpoints, evaluation and per-query rows, MLflow tracking, and the
debugging hooks (sync_debug, deepspeed_shm; the fault hooks are fgdist.faults). Imports data,
kernels and the foundation, never retrieval or report: the finished model goes to a publishing
step the launcher hands in."""
