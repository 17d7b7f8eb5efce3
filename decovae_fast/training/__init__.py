"""Training: the config, its data, the model's initialisation, losses, runtime (device, precision,
torchrun), checkpoints and the loop. `decovae train` is cli/train.py."""
