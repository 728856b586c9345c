"""Data: tokenizers, the embedded corpus, streamed packed batches."""
