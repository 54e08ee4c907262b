"""trainer.cli: ``python -m memstore.trainer.train`` and ``memstore train``."""

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
    with pytest.raises(SystemExit):
        main(["--config", str(CONFIGS / "tiny.yaml"), "--set", "bogus=1"])
    with pytest.raises(SystemExit) as e:
        main(run)
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*run, "--resume", "--overwrite"])
    assert main([*run, "--overwrite"]) == 0


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
