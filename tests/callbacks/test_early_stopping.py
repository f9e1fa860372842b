"""EarlyStopping: stops after `patience` checks without improvement; its state is checkpointed."""

import pytest
from flax import nnx

from meshfit import Engine
from meshfit.callbacks import Callback, EarlyStopping, ModelCheckpoint
from tests.models import MLP, classification_data, quiet

DATA = classification_data(n=256)  # 4 batches of 64 per epoch
VAL = (DATA[0][:64], DATA[1][:64])


class Frozen(MLP):
    """lr=0: the validation metric never changes, so every check after the first is a miss."""

    def __init__(self, rngs):
        super().__init__(rngs, lr=0.0, opt="sgd")


class Validations(Callback):
    def __init__(self):
        self.steps = []

    def on_validation_end(self, engine):
        self.steps.append(engine.global_step)


def test_stops_after_patience_validations_without_improvement():
    seen = Validations()
    es = EarlyStopping("val_acc", patience=2, mode="max")
    engine = Engine(
        "single", max_steps=100, batch_size=64, val_every_n_steps=3, callbacks=[seen, es], **quiet()
    )
    engine.fit(Frozen(nnx.Rngs(0)), DATA, val_data=VAL)
    # validation 1 sets best, 2 and 3 miss -> stop right after the 3rd validation (step 9)
    assert seen.steps == [3, 6, 9] and engine.global_step == 9 and engine.should_stop
    assert (es.wait_count, es.stopped_step) == (2, 9)


def test_improvement_rules_with_mode_and_min_delta():
    es = EarlyStopping("m", patience=1, mode="min", min_delta=0.1)
    es.best = 1.0
    assert es.improved(0.85) and not es.improved(0.95) and not es.improved(float("nan"))
    es = EarlyStopping("m", patience=1, mode="max", min_delta=0.1)
    es.best = 1.0
    assert es.improved(1.2) and not es.improved(1.05)
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping("m", patience=0)
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping("m", mode="up")


def test_training_metric_is_checked_at_epoch_ends():
    es = EarlyStopping("loss", patience=1, mode="min", min_delta=10.0)  # nothing improves by 10
    engine = Engine("single", max_epochs=50, batch_size=64, callbacks=[es], **quiet())
    engine.fit(MLP(nnx.Rngs(0)), DATA)
    assert engine.current_epoch == 2 and engine.global_step == 8


def test_state_is_checkpointed_and_resumed_run_stops_at_the_same_step(tmp_path):
    def engine(max_steps, es):
        return Engine(
            "single", max_steps=max_steps, batch_size=64, val_every_n_steps=2,
            callbacks=[es, ModelCheckpoint(tmp_path)], **quiet(),
        )  # fmt: skip

    straight = engine(100, EarlyStopping("val_acc", patience=3, mode="max"))
    straight.fit(Frozen(nnx.Rngs(0)), DATA, val_data=VAL)
    assert straight.global_step == 8  # best at 2; misses at 4, 6, 8

    first = engine(5, EarlyStopping("val_acc", patience=3, mode="max"))
    first.fit(Frozen(nnx.Rngs(0)), DATA, val_data=VAL)  # validations at 2 and 4: one miss
    es = EarlyStopping("val_acc", patience=3, mode="max")
    resumed = engine(100, es)
    resumed.fit(Frozen(nnx.Rngs(0)), DATA, val_data=VAL, ckpt_path="last")
    assert resumed.global_step == 8 and es.stopped_step == 8
