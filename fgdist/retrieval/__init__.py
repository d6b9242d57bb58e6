"""From a trained run to visual search: the exported model and load_model (export), Parquet
embeddings (embed), a faiss index and queries (index_choice, search, search_batch), the HTTP
service and its page (serve, static/index.html), and what a finished run publishes (publish)."""
