"""Config, trainer loop, distributed set-up, checkpoints, schedules, logging."""
