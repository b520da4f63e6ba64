"""Data: readers for every input format, the embedded world, in-memory sets, grain pipelines.

Modules: `records` (Record, Skips), `readers` (read_records), `images` (decode_image,
normalize), `world` (make_world, write_world, run_stage), `dataset` (ImageTextSet, load_set),
`pipeline` (train_iterator, eval_batches), `tokenizer` (load_tokenizer). Import them
directly; this package imports nothing heavy on its own.
"""
