"""The DeepSeek-VL2 network: vision tower, projector, tile layout, DeepSeekMoE language model."""
