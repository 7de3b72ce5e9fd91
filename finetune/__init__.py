"""python -m finetune.train: the whole network trained the Flax transfer-learning guide way."""
