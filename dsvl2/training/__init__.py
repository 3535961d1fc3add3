"""Training: stage configs, data (JSONL conversations, packing, batches) and the shared loop."""
