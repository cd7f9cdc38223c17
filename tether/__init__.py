"""tether: PPO (RLHF) for Hugging Face causal language models."""

from tether.config import PPOConfig
from tether.ops.masks import first_true_indices, truncate_response
from tether.scoring.reward import get_reward
from tether.trainers.ppo import PPOTrainer

__version__ = "0.1.0"

__all__ = ["PPOConfig", "PPOTrainer", "first_true_indices", "get_reward", "truncate_response", "__version__"]
