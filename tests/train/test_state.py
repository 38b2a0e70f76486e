"""TrainState.advance is the one place that moves the step, the tokens seen and the run's clock; a state
round-trips through its checkpoint dict (which also tolerates records written before elapsed_s)."""

from lockstep.train.state import TrainState


def test_advance_moves_step_tokens_and_clock_together():
    state = TrainState()
    state.advance(4096, 1.5)
    state.advance(4096)  # a tool stepping a trainer without the run's clock keeps the time
    assert (state.step, state.tokens_seen, state.elapsed_s) == (2, 8192, 1.5)


def test_the_state_round_trips_and_an_older_record_loads():
    state = TrainState(step=7, tokens_seen=70, elapsed_s=3.25, loss_window=[1.0, 2.0])
    restored = TrainState()
    window = restored.loss_window
    restored.load_state_dict(state.state_dict())
    assert restored == state and restored.loss_window is window  # the spike detector holds this list
    older = TrainState()
    older.load_state_dict({"step": 3, "tokens_seen": 30})
    assert (older.step, older.elapsed_s, older.loss_window) == (3, 0.0, [])
