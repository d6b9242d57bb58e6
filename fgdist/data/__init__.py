"""Reading training data: shard sets (shardset; remote for HTTP), the column line that says which
rank owns which instance columns (partition), per-rank WebDataset streams with equal steps
(loader) and augmentation (augment). Imports only the top-level foundation (fgdist.LAYERS)."""
