"""serlens: LoRA-adapted Whisper for speech emotion recognition, opened up."""

__version__ = "0.1.0"
