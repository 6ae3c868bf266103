"""Captioning data for M6: the BERT-Chinese tokenizer, the TFRecord format, the input pipeline.

    tokenizer.py  Tokenizer: BERT-Chinese WordPiece (21128 entries) from the cn-clip wheel
    records.py    one tf.train.Example per (image, caption); atomic writer; checked parser
    pipeline.py   make_dataset: sharded, deterministic, static-shape batches; baselines
    demo.py       the embedded OpenMoji / Chinese emoji-name dataset (built offline)

`demo` is not imported here: it is only needed to build data.
"""

from m6t_tf.data.pipeline import (caption_tokens, count_records, eval_num_batches,
                                  make_dataset, shard_record_counts, unigram_perplexity)
from m6t_tf.data.records import (NUM_PATCHES, RecordWriter, is_validation, make_example,
                                 parse_example, shard_name, write_records)
from m6t_tf.data.tokenizer import (CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID, VOCAB_SIZE,
                                   Tokenizer, find_vocab_file)

__all__ = [
    "CLS_ID", "MASK_ID", "NUM_PATCHES", "PAD_ID", "RecordWriter", "SEP_ID", "Tokenizer",
    "UNK_ID", "VOCAB_SIZE", "caption_tokens", "count_records", "eval_num_batches",
    "find_vocab_file", "is_validation", "make_dataset", "make_example", "parse_example",
    "shard_name", "shard_record_counts", "unigram_perplexity", "write_records",
]
