from lib_delta.__main__ import main
from lib_delta.demo import run_demo


def test_demo_writes_a_png_and_transfers_the_adaptation(tmp_path):
    out = tmp_path / "nested" / "demo.png"
    summary = run_demo(out=str(out), samples=600, steps=15)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["exact_case_max_error"] < 1e-12
    assert summary["transfer"][0.0] == 0.0
    assert 0.8 < summary["transfer"][1.0] < 1.2
    assert summary["transfer"][0.5] < summary["transfer"][1.0] < summary["transfer"][1.5]
    # With a source pair that is the target seen through the latent map, lambda = 1 reproduces the ideal exactly.
    assert summary["exact_distance_to_ideal"][1.0] < 1e-9 < summary["distance_to_ideal"][1.0]


def test_cli(tmp_path, capsys):
    out = tmp_path / "d.png"
    assert main(["demo", "--out", str(out), "--samples", "200", "--steps", "8"]) == 0
    assert out.exists()
    assert "of the adaptation transferred" in capsys.readouterr().out
