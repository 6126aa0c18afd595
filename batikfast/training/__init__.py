"""The training loop: phases, DDP, torch.compile, EMA, checkpoints, snapshots, logging.

``train(make_config("tiny", kimg=0.2), "runs/demo")`` is what ``python train.py`` runs; the
pieces (:mod:`.config`, :mod:`.loop`, :mod:`.checkpoint`, :mod:`.distributed`, :mod:`.rundir`,
:mod:`.model`, :mod:`.ema`) import lazily so that ``import batikfast.training`` stays light.
"""


def __getattr__(name):
    if name in ("train", "Trainer", "TrainingDiverged"):
        from batikfast.training import loop

        return getattr(loop, name)
    if name == "make_config":
        from batikfast.training.config import make_config

        return make_config
    raise AttributeError(f"module 'batikfast.training' has no attribute {name!r}")
