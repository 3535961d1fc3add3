"""Token generation: prefill (chunked), one-token decode, sampling, batched engine."""
