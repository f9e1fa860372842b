"""The `meshfit` command and `MeshfitCLI`: runs from YAML configs, LightningCLI's conventions.

    meshfit fit --config run.yaml [--config more.yaml] [--engine.max_steps 100]
                [--model.init_args.dim 128] [--ckpt_path last] [--print_config]
    meshfit validate | test | predict --config run.yaml [--ckpt_path best]
    meshfit launch --nproc N SCRIPT [ARGS...]
    meshfit plot LOG_DIR_OR_METRICS_CSV [--out curves.png]

A config has `model: {class_path, init_args}`, `data: {class_path, init_args}` (a
`meshfit.DataModule`), `engine: {...}` (every `Engine` argument; `strategy` as a name or
`{class_path, init_args}`; `callbacks` as a list of `{class_path, init_args}`), `ckpt_path` and
`seed_everything`. Types come from the signatures (jsonargparse). The module is built as
`ModelClass(**init_args, rngs=nnx.Rngs(seed))` when its `__init__` takes `rngs`, with
`seed = seed_everything` if set, else `engine.seed`: exactly what a script would write.
Class paths are imported with the working directory and each config file's folder on
`sys.path`. The resolved config is written to `<engine.default_root_dir>/config.yaml` (by
process 0) and into every checkpoint's metadata, so `meshfit fit --config <that file>
--ckpt_path last` continues the run exactly.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import os
import re
import sys
from argparse import ArgumentError
from typing import Any

import jax
import numpy as np
import yaml
from flax import nnx
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from meshfit.engine.datamodule import DataModule
from meshfit.engine.engine import Engine
from meshfit.engine.module import TrainModule
from meshfit.engine.processes import distributed
from meshfit.engine.processes.launch import main as launch
from meshfit.engine.processes.plot import main as plot

SUBCOMMANDS = ("fit", "validate", "test", "predict")


class ConfigError(ValueError):
    """A config that cannot be used, named by its path (`engine.callbacks[1].init_args.x`)."""


class MeshfitCLI:
    """Parse `fit | validate | test | predict` with their configs and run it (as LightningCLI).

    `MeshfitCLI(MyModel, MyData)` in a user's `train.py` makes those the default `model` and
    `data` classes (a config may still name subclasses); with no classes, the config names them.
    `args` (default `sys.argv[1:]`) and `run=False` (parse only: see `.engine`, `.model`,
    `.datamodule`, `.config`) help tests and notebooks.
    """

    def __init__(
        self,
        model_class: type[TrainModule] | None = None,
        datamodule_class: type[DataModule] | None = None,
        args: list[str] | None = None,
        run: bool = True,
    ):
        self.model_class, self.datamodule_class = model_class, datamodule_class
        args = sys.argv[1:] if args is None else list(args)
        _extend_path(args)
        self.parser, self.subparsers = self._build_parser()
        try:
            self.config = self.parser.parse_args(args)
        except ArgumentError as exc:
            raise ConfigError(_explain(exc, args, self.subparsers)) from None
        self.subcommand: str = self.config.subcommand
        self.sub_config: Namespace = self.config[self.subcommand]
        self.instantiate()
        self.result: Any = None
        if run:
            self.result = self.run()

    # ------------------------------------------------------------------ parser
    def _build_parser(self) -> tuple[ArgumentParser, dict[str, ArgumentParser]]:
        parser = ArgumentParser(
            prog="meshfit",
            description="Run meshfit from configs.",
            exit_on_error=False,
            allow_abbrev=False,
        )
        commands = parser.add_subcommands(required=True, dest="subcommand")
        subparsers = {}
        for name in SUBCOMMANDS:
            sub = ArgumentParser(
                description=f"Engine.{name} from a config.", exit_on_error=False, allow_abbrev=False
            )
            sub.add_argument("--config", action=ActionConfigFile, help="a YAML config file")
            sub.add_argument("--seed_everything", type=int | None, default=None)
            sub.add_class_arguments(Engine, "engine", instantiate=False)
            sub.add_subclass_arguments(
                self.model_class or TrainModule,
                "model",
                skip={"rngs"},
                instantiate=False,
                required=self.model_class is None,
            )
            sub.add_subclass_arguments(
                self.datamodule_class or DataModule, "data", instantiate=False, required=False
            )
            sub.add_argument("--ckpt_path", type=str | None, default=None)
            for key, cls in (("model", self.model_class), ("data", self.datamodule_class)):
                if cls is not None:
                    sub.set_defaults({key: {"class_path": _class_path(cls)}})
            commands.add_subcommand(name, sub)
            subparsers[name] = sub
        return parser, subparsers

    # ------------------------------------------------------------------ objects
    def instantiate(self) -> None:
        """Build the engine, the data module and the model from the resolved config."""
        cfg = self.sub_config
        devices = cfg.engine.get("devices")
        if isinstance(devices, int) and "MESHFIT_NUM_PROCESSES" not in os.environ:
            with contextlib.suppress(RuntimeError):  # JAX already started: use what it has
                jax.config.update("jax_num_cpu_devices", max(devices, 1))  # the CPU platform
        engine_args = cfg.engine.as_dict()
        if cfg.seed_everything is not None:
            engine_args["seed"] = cfg.seed_everything
        self.engine = Engine(**_instantiate_nested(engine_args))
        self.datamodule = _build(_plain(cfg.get("data")))
        self.model = _build(_plain(cfg.model), rngs_seed=self.engine.seed)
        self.resolved = yaml.safe_load(self.subparsers[self.subcommand].dump(cfg, skip_none=False))
        self.resolved.pop("config", None)
        self.engine.run_config = self.resolved

    def save_config(self) -> str | None:
        """Write the resolved config to `<default_root_dir>/config.yaml` (process 0)."""
        if not distributed.is_main_process():
            return None
        root = self.engine.default_root_dir
        os.makedirs(root, exist_ok=True)
        path = os.path.join(root, "config.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(self.resolved, f, sort_keys=False)
        return path

    # ------------------------------------------------------------------ running
    def run(self) -> Any:
        engine, model, dm, ckpt = (
            self.engine,
            self.model,
            self.datamodule,
            self.sub_config.ckpt_path,
        )
        self.save_config()
        if self.subcommand == "fit":
            return engine.fit(model, datamodule=dm, ckpt_path=ckpt)
        kwargs = {"datamodule": dm, "ckpt_path": ckpt}
        if self.subcommand == "validate":
            result = engine.validate(model, **kwargs)
        elif self.subcommand == "test":
            result = engine.test(model, **kwargs)
        else:
            result = engine.predict(model, **kwargs)
            if distributed.is_main_process():
                path = os.path.join(engine.default_root_dir, "predictions.npz")
                leaves = jax.tree_util.tree_flatten_with_path(result)[0]
                np.savez(path, **{jax.tree_util.keystr(k) or "out": v for k, v in leaves})
                print(f"[meshfit] predictions: {len(leaves)} array(s) -> {path}", flush=True)
            return result
        if distributed.is_main_process():
            print(yaml.safe_dump({self.subcommand: result}, sort_keys=False), flush=True)
        return result


# ---------------------------------------------------------------------- helpers
def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _extend_path(args: list[str]) -> None:
    """Class paths resolve against the working directory and each config file's folder."""
    folders = [os.getcwd()]
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            folders.append(os.path.dirname(os.path.abspath(args[i + 1])))
        elif arg.startswith("--config="):
            folders.append(os.path.dirname(os.path.abspath(arg.split("=", 1)[1])))
    for folder in folders:
        if folder not in sys.path:
            sys.path.insert(0, folder)


def _plain(value: Any) -> Any:
    return value.as_dict() if isinstance(value, Namespace) else value


def _explain(exc: ArgumentError, args: list[str], subparsers: dict[str, ArgumentParser]) -> str:
    """jsonargparse's error, said with the config path, the nearest valid keys, the expected
    type: what was given, what is expected, how to fix it."""
    message = str(exc)
    command = next((a for a in args if a in subparsers), None)
    raw = _raw_config(args)
    for i, item in enumerate(_as_list((raw.get("engine") or {}).get("callbacks"))):
        found = _check_init_args(item, f"engine.callbacks[{i}]")
        if found:
            return found
    unknown = re.search(r"does not accept (?:option|nested key) '([^']+)'", message) or re.search(
        r"unrecognized arguments: --([^\s=]+)", message
    )
    if unknown and command:
        key = unknown.group(1)
        valid = _keys(subparsers[command].get_defaults().as_dict())
        near = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(map(repr, near))}?" if near else ""
        section = key.rpartition(".")[0]
        options = [k for k in valid if k.rpartition(".")[0] == section]
        return (
            f"unknown config key {key!r}.{hint} Valid keys"
            + (f" under {section!r}" if section else "")
            + f": {', '.join(options)}."
        )
    typed = re.search(r'Parser key "([^"]+)":.*?Given value: (.*?)\s*$', message, re.S)
    if typed:
        key, given = typed.group(1), typed.group(2)
        expected = _annotation(key)
        return (
            f"{key}: expected {expected}, got {given!r}. Fix the value in the config or on the "
            f"command line (--{key} VALUE)."
        )
    return message


def _raw_config(args: list[str]) -> dict[str, Any]:
    """The config files named by `--config`, merged shallowly (for diagnostics only)."""
    merged: dict[str, Any] = {}
    for i, arg in enumerate(args):
        path = args[i + 1] if arg == "--config" and i + 1 < len(args) else None
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        if path and os.path.isfile(path):
            with open(path) as f:
                loaded = yaml.safe_load(f) or {}
            for key, value in loaded.items():
                if isinstance(value, dict) and isinstance(merged.get(key), dict):
                    merged[key] = {**merged[key], **value}
                else:
                    merged[key] = value
    return merged


def _keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.append(name)
        if isinstance(value, dict) and "class_path" not in value:
            out += _keys(value, name + ".")
    return out


def _annotation(key: str) -> str:
    """The type `Engine`'s signature gives `engine.<name>` (or "a valid value")."""
    section, _, name = key.partition(".")
    if section == "engine" and name in inspect.signature(Engine.__init__).parameters:
        annotation = inspect.signature(Engine.__init__).parameters[name].annotation
        return str(annotation).replace("typing.", "")
    return "a valid value (see --help)"


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def _check_init_args(item: Any, path: str) -> str | None:
    """A message for the first init argument `item`'s class does not take, or None."""
    if not isinstance(item, dict) or "class_path" not in item:
        return None
    try:
        cls = _import(item["class_path"])
    except (ImportError, AttributeError, ValueError):
        return f"{path}.class_path: cannot import {item['class_path']!r}."
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    valid = [n for n in params if n != "self"]
    for key in dict(item.get("init_args") or {}):
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=3)
            hint = f" Did you mean {', '.join(map(repr, near))}?" if near else ""
            return (
                f"{path}.init_args.{key}: {cls.__name__} has no argument {key!r}.{hint} "
                f"Valid: {', '.join(valid)}."
            )
    return None


def _instantiate_nested(args: dict[str, Any]) -> dict[str, Any]:
    """`{class_path, init_args}` values (strategy, callbacks, logger) -> objects."""

    def build(value: Any) -> Any:
        if isinstance(value, Namespace | dict) and "class_path" in value:
            return _build(value)
        if isinstance(value, list):
            return [build(v) for v in value]
        return value

    return {k: build(v) for k, v in args.items()}


def _build(spec: Any, rngs_seed: int | None = None) -> Any:
    """An object from `{class_path, init_args}`; `rngs=nnx.Rngs(seed)` if its init takes it."""
    if spec is None or not isinstance(spec, Namespace | dict):
        return spec
    cls = _import(spec["class_path"])
    kwargs = dict(spec.get("init_args") or {})
    kwargs = {k: v.as_dict() if isinstance(v, Namespace) else v for k, v in kwargs.items()}
    if rngs_seed is not None and "rngs" in inspect.signature(cls.__init__).parameters:
        kwargs["rngs"] = nnx.Rngs(rngs_seed)
    return cls(**kwargs)


def _usage() -> str:
    return (
        "usage: meshfit {fit,validate,test,predict} --config RUN.yaml [--KEY VALUE ...]\n"
        "       meshfit launch --nproc N [--coordinator HOST:PORT] "
        "[--cpu-devices-per-process K] SCRIPT [ARGS...]\n"
        "       meshfit plot LOG_DIR_OR_METRICS_CSV [--out curves.png]"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "launch":
        return launch(argv[1:])
    if argv[0] == "plot":
        return plot(argv[1:])
    if argv[0] in SUBCOMMANDS:
        try:
            MeshfitCLI(args=argv)
        except ConfigError as exc:
            print(f"meshfit {argv[0]}: error: {exc}", file=sys.stderr)
            return 2
        return 0
    commands = ", ".join((*SUBCOMMANDS, "launch", "plot"))
    print(f"meshfit: unknown command {argv[0]!r}; use one of {commands}.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
