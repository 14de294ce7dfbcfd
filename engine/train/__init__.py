"""Training: tokenizers, pretraining and SFT (trainer.py), evaluation (evaluate.py)."""
