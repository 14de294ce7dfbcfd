"""RLHF: losses (losses.py); reward-model, PPO and DPO training build on them."""
