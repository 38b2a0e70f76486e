"""The step being trained, for test assets that change numerics at chosen steps (imported once, the
patch is applied once: TrainStep.run records the step it runs, for the trainer and for replays alike)."""

from lockstep.train.step import TrainStep

current_step = [0]

if not getattr(TrainStep.run, "tracks_the_step", False):
    _run = TrainStep.run

    def run(self, step: int, *args, **kwargs):
        current_step[0] = step
        return _run(self, step, *args, **kwargs)

    run.tracks_the_step = True
    TrainStep.run = run
