"""The command line `python -m kdml.train` (every command, end to end and quiet:
tests/test_command_line.py)."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from absl import flags

from kdml import train as train_cli
from kdml.config import TrainConfig, is_flag, setting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_main(module, argv):
    """Parses `argv` with absl and runs `module.main`; returns the exit code."""
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["prog", *argv])
    try:
        module.main(["prog"])
        return 0
    except SystemExit as exit_:
        return exit_.code
    finally:
        flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("argv,message", [
    (["--method=magic"], "Unknown method 'magic'. Valid methods: "),
    (["--dataset=imagenet"], "Unknown dataset 'imagenet'. Valid datasets: synthetic, folder:<dir>, "
                             "tfds:<name>."),
    (["--dataset=tfds:mnist"], "mnist"),
    (["--dataset=folder:/no/such/dir"], "/no/such/dir"),
    (["--classes_per_batch=500"], "--classes_per_batch"),
    (["--recall_ks=1,two"], "--recall_ks must be comma-separated integers"),
    (["--xbm_size=256"], "--xbm_size wraps a pair-based method (circle, contrastive, "
                         "multi_similarity, ntxent, supcon, triplet); --method=proxy_anchor"),
    (["--views=3"], "--views must be 1 or 2. Received: views=3"),
    (["--method=ntxent", "--views=1"], "needs --views=2. Received: --views=1"),
    (["--method=triplet", "--xbm_size=64"], "--xbm_size=64 is smaller than the global batch "
                                            "of 128 embeddings"),
])
def test_bad_input_is_a_one_line_error_with_exit_code_2(argv, message, capsys, tmp_path):
    code = _run_main(train_cli, argv + [f"--output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not any(line.startswith("Traceback") for line in err)


def test_helpfull_lists_every_training_flag():
    result = subprocess.run([sys.executable, "-m", "kdml.train", "--helpfull"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.returncode  # asked for: not an error (absl says 1)
    out = result.stdout
    for name in ("method", "dataset", "eval_dataset", "data_dir", "backbone", "weights",
                 "embedding_dim", "image_size", "classes_per_batch", "images_per_class", "epochs",
                 "lr", "output_dir", "strategy", "mixed_precision", "seed", "resume", "eval_every"):
        assert f"--{name}" in out or f"--[no]{name}" in out, name  # absl shows bools as --[no]x


# The flags as `kdml/train.py` declared them one by one, before they were generated from
# `TrainConfig` (name -> parser, default, help text, enum choices), captured from absl.
# New settings need no entry; a deliberate change of a default or a help text updates
# its entry in the same commit (so far: --so_strength, 10 -> 1e-3 in the paper's units, chosen on validation;
# --dataset, --output_dir, --seed: the shared wording of kdml.command_line; --method's help,
# listing the classification-based and the pair and triplet methods of issue 21;
# --backbone's help and --weights, no longer a choice of none | imagenet: keras-hub
# backbones take a preset name or a local preset directory, issue 32).
_FLAGS_SNAPSHOT = os.path.join(ROOT, "tests", "training", "train_flags.json")


def test_generated_flags_keep_every_name_default_help_and_choice_of_the_snapshot():
    snapshot = json.load(open(_FLAGS_SNAPSHOT))
    generated = {flag.name: flag for flag in flags.FLAGS.get_flags_for_module(train_cli.__name__)}
    for name, expected in snapshot.items():
        flag = generated[name]
        assert type(flag.parser).__name__ == expected["type"], name
        assert flag.default == expected["default"], name
        assert flag.help == expected["help"], name
        choices = list(getattr(flag.parser, "enum_values", None) or [])
        assert choices == expected.get("enum_values", []), name
    # Every flag is a setting of TrainConfig, and every setting is a flag.
    settings = {f.name for f in dataclasses.fields(TrainConfig) if is_flag(f)}
    assert set(generated) == settings and set(snapshot) <= settings


def _config(argv):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["prog", *argv])
    try:
        return train_cli.config_from_flags()
    finally:
        flags.FLAGS.unparse_flags()


def test_default_flags_give_the_default_config_and_special_flags_parse():
    assert _config([]) == TrainConfig()
    config = _config(["--freeze_batchnorm=false", "--recall_ks=1,5", "--crt_aux_prototypes=",
                      "--crt_aux_dims=64,32", "--lr=0.5", "--noverify_images", "--so_mode=rows",
                      "--image_size=40"])
    assert config.freeze_batchnorm is False and config.recall_ks == (1, 5)
    assert config.crt_aux_prototypes == () and config.crt_aux_dims == (64, 32)
    assert config.lr == 0.5 and config.verify_images is False and config.so_mode == "rows"
    assert config.image_size == 40 and config.weights is None  # unset Optional flags stay None
    assert _config(["--freeze_batchnorm=true"]).freeze_batchnorm is True
    assert _config(["--freeze_batchnorm=auto"]).freeze_batchnorm is None


def test_a_new_setting_is_one_field_and_becomes_a_flag():
    """What adding a method's hyperparameter takes: one `setting(...)` line."""
    @dataclasses.dataclass(frozen=True)
    class Extended(TrainConfig):
        new_margin: float = setting(0.25, "newmethod: the margin.")
        new_mode: str = setting("a", "newmethod: the mode.", choices=("a", "b"))

    values = flags.FlagValues()
    train_cli.define_flags(Extended, values)
    values(["prog", "--new_mode=b"])
    assert values["new_margin"].default == 0.25 and values["new_margin"].help == "newmethod: the margin."
    assert values.new_mode == "b" and list(values["new_mode"].parser.enum_values) == ["a", "b"]
    assert set(values) == {f.name for f in dataclasses.fields(Extended) if is_flag(f)}
    assert "new_margin" in values and "eval_batch_size" not in values  # a plain field: no flag


def test_a_setting_outside_its_choices_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"--so_mode must be one of auto, rows, columns. "
                                         r"Received: so_mode='diagonal'"):
        TrainConfig(so_mode="diagonal")


def test_quiet_startup_reads_verbosity_and_replays_captured_stderr_on_failure(capfd):
    from kdml import quiet_startup

    assert quiet_startup.is_kdml_command_line(["python", "-m", "kdml.train", "--epochs=1"])
    assert not quiet_startup.is_kdml_command_line(["python", "-m", "pytest", "tests"])
    for argv in (["-v", "0"], ["--verbosity=1"], ["-v=0"], ["--verbosity", "-1"]):
        assert quiet_startup.asks_for_verbosity(argv), argv
        assert quiet_startup.quiet_startup(argv) is False  # skipped: the logs stay
    assert not quiet_startup.asks_for_verbosity(["--verify_images", "--method=pddm"])
    with quiet_startup.stderr_captured():
        os.write(2, b"noise from C++\n")
    with pytest.raises(RuntimeError), quiet_startup.stderr_captured():
        os.write(2, b"why the import failed\n")
        raise RuntimeError("import failed")
    assert capfd.readouterr().err == "why the import failed\n"
