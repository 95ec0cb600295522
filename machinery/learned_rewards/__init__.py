"""Learned rewards beyond the paper's, the ones DDPO's successors train on: one file a reward, each
with its formula, its source and its loader, declared by one line in reward_specs.REWARDS (and its
settings, if any, in reward_specs.RewardSettings). docs/rewards.md says what each costs here.
"""
