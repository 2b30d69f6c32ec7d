import json
import subprocess
import sys

import pytest

from hieratok.cli import main, parse_overrides


def test_parse_overrides():
    assert parse_overrides(["scales=[1,4,16]", "downsample=interp", "latent_channels=32"]) == {
        "scales": [1, 4, 16], "downsample": "interp", "latent_channels": 32}


def test_info_json_matches_paper_shape(capsys):
    assert main(["info", "hieratok-f16d16", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["decoder_tokens"] == 341 and info["encoder_tokens"] == 256
    assert abs(info["params"]["total"] / 401.18e6 - 1) < 0.03


def test_info_bad_override_is_one_line_error(capsys):
    assert main(["info", "tiny", "scales=[1,3]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "scales [1, 3] must end at the full grid 8" in err


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "hieratok", "info", "tiny"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "decoder 85" in r.stdout


@pytest.mark.parametrize("override,match", [
    ("optim.lr.x=1", "error"),
    ("steps=[1,", "expected"),
    ("log_every=0", "'log_every' must be an integer >= 1"),
    ("optim.warmup_ratio=.nan", "'optim.warmup_ratio' must be a finite number"),
])
def test_cli_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys, override, match):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hieratok train: error:") and "\n" not in err and match in err, err
    assert not out.exists()  # refused before any folder or network was made
    with pytest.raises(Exception):
        main(["train", "--out", str(out), override, "--debug"])


def test_cli_out_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["train", "--out", str(f), "steps=1"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_version_has_one_source(capsys):
    import importlib.metadata

    from hieratok import __version__
    from hieratok.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"hieratok {__version__}"
    assert importlib.metadata.version("hieratok") == __version__  # pyproject reads hieratok/version.py


@pytest.mark.parametrize("preset,kind,millions", [("restok-l-128", "restok", 661.79), ("gpt-l", "llamagen-gpt", 326.26),
                                                  ("dit-xl", "dit", 674.83)])
def test_info_covers_every_family(preset, kind, millions, capsys):
    """Parameter counts of the released / published sizes (ResTok 662M, GPT-L 326M, DiT-XL/2 675M)."""
    from hieratok.cli import main

    assert main(["info", preset, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == kind and info["params"]["total"] / 1e6 == pytest.approx(millions, abs=0.005)
    assert sum(v for k, v in info["params"].items() if k != "total") == info["params"]["total"]


@pytest.mark.parametrize("command", ["demo", "ablate"])
def test_no_replan_reaches_the_ablation(command, monkeypatch, tmp_path):
    from hieratok import ablation, demo
    from hieratok.ablation import AblationConfig

    seen = []

    def capture(cfg, *a):
        seen.append(cfg.ablation() if isinstance(cfg, demo.DemoConfig) else cfg)
        raise RuntimeError("captured")

    monkeypatch.setattr(demo, "run_demo", capture)
    monkeypatch.setattr(ablation, "run_ablation", capture)
    for extra in ([], ["--no-replan"]):
        assert main([command, "--out", str(tmp_path / "x"), *extra]) == 2  # the one-line error of "captured"
    assert [c.replan_factor for c in seen] == [AblationConfig.replan_factor, None]


@pytest.mark.parametrize("argv, kept", [
    (["reconstruct", "missing.png", "--checkpoint", "missing"], True),
    (["eval", "recon", "--checkpoint", "missing"], True),
    (["cache-latents", "--checkpoint", "missing", "--out", "c"], True),
    (["info", "tiny"], False),
    (["train", "--preset", "tiny", "--steps", "0", "--out", "r"], False),  # TrainConfig.keep_freed_memory decides
])
def test_batch_inference_commands_keep_freed_memory(argv, kept, monkeypatch, tmp_path):
    import hieratok.machine

    calls = []
    monkeypatch.setattr(hieratok.machine, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.chdir(tmp_path)
    main(argv)  # the missing files make each command fail fast, after the allocator setting
    assert bool(calls) == kept
