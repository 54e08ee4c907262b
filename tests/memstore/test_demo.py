"""`memstore demo` (memstore.demo): a small memory-layer model on synthetic facts lowers
its loss below 0.9 of its first in 40 steps, and the command line prints its throughput
line.
"""

from memstore.cli import main
from memstore.demo import DemoArgs, run_demo


def test_demo_loss_falls():
    r = run_demo(
        DemoArgs(steps=40, batch=64, n_keys=32, dim=32, heads=2, k=8, facts=256), progress=False
    )
    assert r.rows == 1024
    assert r.last_loss < 0.9 * r.first_loss
    assert r.tokens_per_s > 0


def test_cli_demo_prints_the_throughput_line(capsys):
    assert (
        main(
            [
                "demo",
                "--steps",
                "3",
                "--batch",
                "16",
                "--n-keys",
                "8",
                "--dim",
                "16",
                "--heads",
                "1",
                "--k",
                "4",
                "--facts",
                "32",
            ]
        )
        == 0
    )
    assert "tokens/s" in capsys.readouterr().out
