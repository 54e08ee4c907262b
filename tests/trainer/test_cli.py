"""trainer.cli: ``python -m memstore.trainer.train`` and ``memstore train`` train a tiny
config, refuse a used run directory with exit status 2 and overwrite it on request;
checked on the files the run writes.
"""

import pytest

from memstore.trainer.cli import main

from .helpers import CONFIGS


def test_main_trains_refuses_a_used_run_dir_and_overwrites_on_request(tmp_path, capsys):
    run = [
        "--config",
        str(CONFIGS / "tiny.yaml"),
        "--set",
        f"run_dir={tmp_path}",
        "--set",
        "progress=false",
        "--set",
        "steps=2",
    ]
    assert main(run) == 0
    assert "2 steps" in capsys.readouterr().out
    _assert_usage_error(
        capsys,
        ["--config", str(CONFIGS / "tiny.yaml"), "--set", "bogus=1"],
        "memstore train: error: --set: expected a key among [",
        "got bogus",
    )
    _assert_usage_error(
        capsys, run, "memstore train: error: run_dir", "without checkpoints", "--overwrite"
    )
    _assert_usage_error(
        capsys,
        [*run, "--resume", "--overwrite"],
        "memstore train: error: argument --overwrite: not allowed with argument --resume",
    )
    assert main([*run, "--overwrite"]) == 0
    assert "2 steps" in capsys.readouterr().out


def _assert_usage_error(capsys, argv: list[str], *fragments: str) -> None:
    """main(argv) exits with code 2 (not 0, not an exception of its own), prints nothing
    on stdout, and its stderr holds every fragment."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    for fragment in fragments:
        assert fragment in err, err


def test_memstore_train_command_runs_the_trainer(tmp_path, capsys):
    """``memstore train`` reaches trainer.train.main through the memstore.commands entry
    point (installed by pip install -e .), without memstore importing the trainer."""
    from memstore import cli

    assert "train" in cli._plugins()
    assert (
        cli.main(
            [
                "train",
                "--config",
                str(CONFIGS / "tiny.yaml"),
                "--set",
                f"run_dir={tmp_path}",
                "--set",
                "progress=false",
                "--set",
                "steps=2",
            ]
        )
        == 0
    )
    assert "2 steps" in capsys.readouterr().out
