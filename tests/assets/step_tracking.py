"""The step being trained, for test assets that change numerics at chosen steps (imported once, the
patch is applied once: Trainer.train_step records self.state.step + 1 before it runs)."""

from lockstep.train import trainer as trainer_module

current_step = [0]

if not getattr(trainer_module.Trainer.train_step, "tracks_the_step", False):
    _train_step = trainer_module.Trainer.train_step

    def train_step(self, *args, **kwargs):
        current_step[0] = self.state.step + 1
        return _train_step(self, *args, **kwargs)

    train_step.tracks_the_step = True
    trainer_module.Trainer.train_step = train_step
