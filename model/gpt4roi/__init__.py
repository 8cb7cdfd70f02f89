"""GPT4RoI: a LLaMA language model whose `<bbox>` tokens carry RoI features pooled from multi-level CLIP
features. Configuration, modeling, processing, tokenization, generation and scoring, training, the conversion
of the released checkpoint, and the engine that serves it (`model.gpt4roi.engine.GPT4RoIEngine`)."""
