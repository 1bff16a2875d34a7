"""The learner side: config schema, SFT, RL algorithms and the training loops."""
