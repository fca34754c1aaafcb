"""Learned policies (PPO agents, the activation predictor) and their plug-in adapters."""
