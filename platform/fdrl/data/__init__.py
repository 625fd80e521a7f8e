"""Data: readers of raw datasets, the shard writer and its manifest, per-worker shard streams."""
