"""Qwen3-VL behind the engine interface (`model.qwen3vl.engine.Qwen3VLEngine`)."""
