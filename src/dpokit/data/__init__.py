"""Preference data, from a file or hub name to tokenized pairs; no torch is imported here.

- `sources`: read records from JSONL/JSON/CSV/Parquet files, folders, `save_to_disk` output or the hub.
- `formats`: recognise and normalise the record formats (explicit, conversational, ranked, unpaired, SFT).
- `tokenization`: exact prompt/completion boundaries, truncation, and what was cut or dropped.
- `encoding`: the ids those boundaries compare, each completion tokenized behind the prompt's tail only.
- `mixture`: several sources in one training set, each weighted (`--data a.jsonl:0.7,b.jsonl:0.3`).
- `streaming`: data larger than memory, tokenized in shards into the cache and read back memory-mapped.
- `cache`: tokenized results on disk under a key of (data bytes, tokenizer, settings, code).
- `preparation`: the glue the training loop calls (`prepare`): load, split, tokenize, report, cache.
- `synthetic`: the built-in task; `inspect`: `dpo data inspect`.
"""
