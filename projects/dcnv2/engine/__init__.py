from .trainer import Trainer, build_training_loop, create_ddp_model

__all__ = ["Trainer", "build_training_loop", "create_ddp_model"]
