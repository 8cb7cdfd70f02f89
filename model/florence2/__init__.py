"""Florence-2 behind the engine interface (`model.florence2.engine.Florence2Engine`), on transformers' native
Florence-2 classes. Nothing is imported here, so the registry can name the engine without loading torch."""
