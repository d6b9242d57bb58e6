"""The shard-building CLI: `python -m shards build | inspect | verify`."""
