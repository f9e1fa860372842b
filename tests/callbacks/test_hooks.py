"""Callback hooks run in the documented order, with the engine first."""

from flax import nnx

from meshfit import Engine
from meshfit.callbacks import Callback
from tests.models import MLP, classification_data, quiet


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def __getattribute__(self, name):
        attr = object.__getattribute__(self, name)
        if name.startswith(("on_", "setup", "teardown")) and callable(attr):

            def record(engine, *args):
                assert isinstance(engine, Engine)
                self.calls.append(name)
                return attr(engine, *args)

            return record
        return attr

    # override every hook so the engine calls it
    def setup(self, engine): ...
    def on_fit_start(self, engine): ...
    def on_train_epoch_start(self, engine): ...
    def on_train_batch_start(self, engine, batch, batch_idx): ...
    def on_train_batch_end(self, engine, outputs, batch, batch_idx): ...
    def on_log(self, engine, metrics): ...
    def on_validation_start(self, engine): ...
    def on_validation_end(self, engine): ...
    def on_train_epoch_end(self, engine): ...
    def on_fit_end(self, engine): ...
    def on_exception(self, engine, exception): ...
    def teardown(self, engine): ...


def test_hook_order_over_two_epochs():
    x, y = classification_data(n=128)
    rec = Recorder()
    engine = Engine(
        strategy="dp", max_epochs=2, batch_size=64, log_every_n_steps=2, callbacks=[rec], **quiet()
    )
    engine.fit(MLP(nnx.Rngs(0)), (x, y), val_data=(x[:64], y[:64]))
    batch = ["on_train_batch_start", "on_train_batch_end"]
    epoch = [
        "on_train_epoch_start",
        *batch,
        "on_train_batch_start",
        "on_log",  # step 2 hits log_every_n_steps=2 before on_train_batch_end
        "on_train_batch_end",
        "on_validation_start",
        "on_log",
        "on_validation_end",
        "on_train_epoch_end",
    ]
    assert rec.calls == ["setup", "on_fit_start", *epoch, *epoch, "on_fit_end", "teardown"]


def test_exception_hook_then_teardown():
    class Boom(Callback):
        def on_train_batch_end(self, engine, outputs, batch, batch_idx):
            raise RuntimeError("boom")

    rec = Recorder()
    x, y = classification_data(n=128)
    engine = Engine(
        strategy="single", max_epochs=1, batch_size=64, callbacks=[Boom(), rec], **quiet()
    )
    try:
        engine.fit(MLP(nnx.Rngs(0)), (x, y))
    except RuntimeError as e:
        assert str(e) == "boom"
    else:
        raise AssertionError("fit did not raise")
    assert rec.calls[-2:] == ["on_exception", "teardown"]


def test_outputs_reach_on_train_batch_end_as_device_arrays():
    seen = []

    class Peek(Callback):
        def on_train_batch_end(self, engine, outputs, batch, batch_idx):
            seen.append((batch_idx, sorted(outputs)))

    x, y = classification_data(n=128)
    Engine(strategy="dp", max_steps=3, batch_size=64, callbacks=[Peek()], **quiet()).fit(
        MLP(nnx.Rngs(0)), (x, y)
    )
    assert seen == [(0, ["acc", "loss"]), (1, ["acc", "loss"]), (0, ["acc", "loss"])]
