"""tether: PPO, GRPO, RLOO and DPO (RLHF) for Hugging Face causal language models, with the SFT
and reward-model stages."""

from tether.config import DPOConfig, GRPOConfig, PPOConfig, RewardConfig, RLOOConfig, SFTConfig
from tether.ops.masks import first_true_indices, truncate_response
from tether.scoring.reward import get_reward
from tether.trainers.dpo import DPOTrainer
from tether.trainers.grpo import GRPOTrainer, RLOOTrainer
from tether.trainers.ppo import PPOTrainer
from tether.trainers.reward import RewardTrainer
from tether.trainers.sft import SFTTrainer

__version__ = "0.1.0"

__all__ = [
    "DPOConfig",
    "DPOTrainer",
    "GRPOConfig",
    "GRPOTrainer",
    "PPOConfig",
    "PPOTrainer",
    "RewardConfig",
    "RewardTrainer",
    "RLOOConfig",
    "RLOOTrainer",
    "SFTConfig",
    "SFTTrainer",
    "first_true_indices",
    "get_reward",
    "truncate_response",
    "__version__",
]
